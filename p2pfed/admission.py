"""Swarm admission: who may take part in a run's DHT records, averaging groups and state downloads.

    p2pfed keygen --out swarm.key                    # 32 random bytes, hex in a 0600 file; share it with your peers
    admission = Admission.from_config(cfg.privacy)   # None when the run has neither key nor lists
    validator = admission.dht_validator()            # hivemind DHT: every record sealed with the key
    token = admission.token(peer_id)                 # goes in each round's gathered metadata
    reason = admission.check(peer_id, token)         # "" when admitted, else why not (one line)

With a swarm key, every DHT record of the run is sealed with ChaCha20-Poly1305 under a key derived from it (HKDF),
bound to the record's key, subkey and expiration: a peer without the key can neither read the swarm's records (peer
announcements, group keys, state declarations) nor write one that others accept. Every averaging group also checks,
before any byte of an update moves, that each member carries an HMAC of its own libp2p peer id under the swarm key
(the peer id is the one libp2p authenticated for the connection), and a leader refuses join requests without one;
state downloads go only to peers with a sealed announcement. `privacy.allow` (peer ids; empty: anyone with the key)
and `privacy.revoke` (peer ids) apply on top. libp2p's transport encryption stays on throughout.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pfed.config import PrivacyConfig
from p2pfed.errors import UserError

__all__ = ["Admission", "SealedRecords", "read_swarm_key", "write_swarm_key"]

logger = logging.getLogger(__name__)

_HEADER = "p2pfed swarm key v1"
_NONCE = 12


def write_swarm_key(path: str | Path) -> None:
    """A new random swarm key in `path` (created with mode 0600; an existing file is never overwritten)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{str(path)!r} already exists: refusing to overwrite a swarm key") from None
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{_HEADER}\n{secrets.token_hex(32)}\n")


def read_swarm_key(path: str | Path) -> bytes:
    """The 32 key bytes of a swarm key file; UserError naming what is wrong with it."""
    path = Path(path)
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        raise UserError(f"privacy.swarm_key {str(path)!r} does not exist (make one with `p2pfed keygen`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"privacy.swarm_key {str(path)!r} cannot be read: {e}") from None
    body = lines[-1] if lines and " ".join(lines[:-1]) == _HEADER else ""
    try:
        key = bytes.fromhex(body)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UserError(f"privacy.swarm_key {str(path)!r} is not a p2pfed swarm key (make one with `p2pfed keygen`)")
    return key


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"p2pfed-swarm", info=purpose).derive(key)


class Admission:
    """The run's admission rules: a swarm key (or none), an allowlist (empty: anyone) and a revocation list."""

    def __init__(self, key: bytes | None, *, allow: Iterable[str] = (), revoke: Iterable[str] = ()) -> None:
        self.key = key
        self.allow, self.revoke = frozenset(allow), frozenset(revoke)
        self._mac_key = _derive(key, b"admit") if key is not None else b""
        # direct TCP averaging connections are sealed under this one (p2pfed/channel.py: SealedChannel)
        self.seal_key = _derive(key, b"tcp") if key is not None else None

    @classmethod
    def from_config(cls, privacy: PrivacyConfig) -> Admission | None:
        if privacy.swarm_key is None and not privacy.allow and not privacy.revoke:
            return None
        key = read_swarm_key(privacy.swarm_key) if privacy.swarm_key is not None else None
        return cls(key, allow=privacy.allow, revoke=privacy.revoke)

    def token(self, peer_id: bytes) -> bytes:
        """This peer's proof of holding the key: HMAC-SHA256 of its peer id (b"" without a key)."""
        if self.key is None:
            return b""
        return hmac.new(self._mac_key, b"p2pfed-admit\x00" + peer_id, hashlib.sha256).digest()

    def check(self, peer_id: bytes, token: object, *, name: str) -> str:
        """ "" when the peer (`name`: its base58 id) is admitted, else the reason in one line."""
        if name in self.revoke:
            return f"peer {name} is on privacy.revoke"
        if self.allow and name not in self.allow:
            return f"peer {name} is not on privacy.allow"
        if self.key is not None and not (isinstance(token, bytes) and hmac.compare_digest(token, self.token(peer_id))):
            return f"peer {name} does not hold this swarm's key"
        return ""

    def dht_validator(self) -> SealedRecords | None:
        return SealedRecords(self.key) if self.key is not None else None


class SealedRecords(RecordValidatorBase):
    """hivemind DHT record validator: values sealed (encrypted and authenticated) under the swarm key."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(_derive(key, b"dht"))
        self._last_warning = 0.0

    @staticmethod
    def _bound(record: DHTRecord) -> bytes:
        return b"p2pfed-dht\x00" + record.key + b"\x00" + record.subkey + struct.pack("<d", record.expiration_time)

    def sign_value(self, record: DHTRecord) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, record.value, self._bound(record))

    def _open(self, record: DHTRecord) -> bytes | None:
        if len(record.value) < _NONCE + 16:
            return None
        try:
            return self._aead.decrypt(record.value[:_NONCE], record.value[_NONCE:], self._bound(record))
        except InvalidTag:
            return None

    def validate(self, record: DHTRecord) -> bool:
        if self._open(record) is not None:
            return True
        now = time.monotonic()
        if now - self._last_warning > 60.0:  # one line a minute, however many records an intruder sends
            self._last_warning = now
            logger.warning("rejected a DHT record not sealed with this swarm's key (a peer without the key?)")
        return False

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = self._open(record)
        return opened if opened is not None else record.value

    @property
    def priority(self) -> int:
        return 100  # the outermost layer: sealed last when storing, opened first when reading

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
