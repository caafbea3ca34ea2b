"""Discovery: owns the hivemind DHT; announces this peer under the run's key with an expiry and lists live peers."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import hivemind
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time

from p2pfed.actors.base import Actor
from p2pfed.actors.messages import Announce, GetPeers, PeerRecord
from p2pfed.config import check_initial_peers
from p2pfed.errors import UserError
from p2pfed.lifeline import start_lifeline

__all__ = ["Discovery", "peers_key", "runs_key", "start_dht", "read_peers"]

logger = logging.getLogger(__name__)

RUNS_KEY = "p2pfed.runs"
BOOTSTRAP_RETRY_S = 18.0  # keeps an unreachable address's one-line error well under 30 s


def runs_key() -> str:
    return RUNS_KEY


def peers_key(run_id: str) -> str:
    return f"p2pfed.{run_id}.peers"


def start_dht(
    *,
    initial_peers: Sequence[str],
    listen: str,
    client_mode: bool = False,
    identity_path: str | None = None,
    announce_maddrs: Sequence[str] = (),
    startup_timeout: float = 30.0,
    record_validators: Sequence[Any] = (),
    retry_s: float = BOOTSTRAP_RETRY_S,
) -> hivemind.DHT:
    """Start a DHT process bound to `listen` only, with NAT traversal off; user mistakes become UserError. An
    unreachable bootstrap address is retried for `retry_s` seconds (a busy live peer may miss the first dial)."""
    check_initial_peers(initial_peers)
    kwargs: dict[str, Any] = {}
    if identity_path is not None:
        kwargs["identity_path"] = identity_path
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if record_validators:  # e.g. the swarm key's sealing (p2pfed/admission.py)
        kwargs["record_validators"] = list(record_validators)
    # A daemon that cannot dial its bootstrap peers exits at once; under load a live peer can miss that first
    # dial, so keep trying for a while before calling the address unreachable.
    give_up = time.monotonic() + retry_s
    for attempt in itertools.count():
        try:
            return _LifelineDHT(
                initial_peers=list(initial_peers),
                start=True,
                host_maddrs=[listen],  # client mode too: never the daemon's default of every interface
                client_mode=client_mode,
                nat_port_map=False,
                auto_nat=False,
                startup_timeout=startup_timeout,
                await_ready=True,
                **kwargs,
            )
        except P2PDaemonError as e:
            detail = str(e).split(": ", 1)[-1].strip()
            detail = detail.split(" ", 2)[-1] if detail[:4].isdigit() else detail  # drop the daemon's timestamp
            if not (initial_peers and "bootstrap" in detail):
                raise UserError(f"the libp2p daemon failed to start: {detail}") from None
            if time.monotonic() + 1.0 + attempt > give_up:
                peers = ", ".join(initial_peers)
                raise UserError(f"could not reach any of --initial-peers {peers}: {detail}") from None
            logger.debug("bootstrap dial failed (%s); retrying", detail)
            time.sleep(1.0 + attempt)
        except (RuntimeError, TimeoutError) as e:
            # the daemon connected, but no bootstrap node's DHT answered its ping in time: busy, or not a p2pfed peer
            if time.monotonic() + 1.0 + attempt > give_up:
                peers = ", ".join(initial_peers) or listen
                raise UserError(f"could not join the swarm via {peers}: {str(e).splitlines()[0]}") from None
            logger.debug("DHT bootstrap failed (%s); retrying", e)
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


class _LifelineDHT(hivemind.DHT):
    """hivemind's DHT process, which exits (taking its libp2p daemon along) when the peer's main process dies."""

    def run(self) -> None:
        start_lifeline()
        super().run()


def read_peers(dht: hivemind.DHT, run_id: str, *, timeout: float) -> list[PeerRecord]:
    """Live peer records of a run (blocking; run it in a thread from async code)."""
    found = dht.get(peers_key(run_id), latest=True, return_future=True).result(timeout=timeout)
    if found is None or not isinstance(found.value, dict):
        return []
    fields = {f.name for f in dataclasses.fields(PeerRecord)}
    now = get_dht_time()
    records = []
    for item in found.value.values():
        value = getattr(item, "value", None)
        if not isinstance(value, dict) or getattr(item, "expiration_time", 0) < now:
            continue
        try:
            records.append(PeerRecord(**{k: v for k, v in value.items() if k in fields}))
        except TypeError:
            logger.warning("ignored a malformed peer record: %r", value)
    return sorted(records, key=lambda r: r.peer_id)


class Discovery(Actor):
    name = "discovery"

    def __init__(
        self,
        *,
        run_id: str,
        listen: str,
        initial_peers: Sequence[str],
        client_mode: bool,
        identity_path: str | None,
        record_ttl: float,
        announce_maddrs: Sequence[str] = (),
        announce_every: float,
        run_info: dict[str, Any],
        request_timeout: float = 10.0,
        record_validators: Sequence[Any] = (),
        bootstrap_retry_s: float = BOOTSTRAP_RETRY_S,
    ) -> None:
        super().__init__()
        self.run_id, self.listen, self.initial_peers = run_id, listen, list(initial_peers)
        self.client_mode, self.identity_path = client_mode, identity_path
        self.announce_maddrs = list(announce_maddrs)
        self.record_ttl, self.announce_every = record_ttl, announce_every
        self.run_info = run_info
        self.request_timeout = request_timeout
        self.record_validators = list(record_validators)
        self.bootstrap_retry_s = bootstrap_retry_s
        self.dht: hivemind.DHT | None = None
        self._record: PeerRecord | None = None
        self.published: PeerRecord | None = None  # the record as last stored: what other peers read of this one
        self._announcer: asyncio.Task[None] | None = None

    @property
    def peer_id(self) -> str:
        assert self.dht is not None
        return self.dht.peer_id.to_base58()

    def visible_maddrs(self) -> list[str]:
        assert self.dht is not None
        return [str(m) for m in self.dht.get_visible_maddrs()]

    async def on_start(self) -> None:
        t0 = time.perf_counter()
        self.dht = await asyncio.to_thread(
            start_dht,
            initial_peers=self.initial_peers,
            listen=self.listen,
            client_mode=self.client_mode,
            identity_path=self.identity_path,
            announce_maddrs=self.announce_maddrs,
            record_validators=self.record_validators,
            retry_s=self.bootstrap_retry_s,
        )
        logger.info("DHT up in %.1fs", time.perf_counter() - t0)
        self._announcer = asyncio.create_task(self._announce_periodically())

    async def on_stop(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        if self._record is not None and not self._record.finished:
            try:  # say goodbye: mark the record finished so status and other peers see it at once
                self._record = dataclasses.replace(self._record, finished=True)
                await self._store(timeout=min(self.request_timeout, 3.0))
            except Exception as e:
                logger.debug("final announcement failed: %r", e)
        if self.dht is not None:
            await asyncio.to_thread(self.dht.shutdown)
            self.dht = None

    async def _store(self, timeout: float | None = None) -> None:
        assert self.dht is not None and self._record is not None
        now = get_dht_time()
        value = dataclasses.asdict(self._record)
        value["maddrs"] = list(value["maddrs"])
        value["announced_at"] = now
        self.published = self._record
        futures = [
            self.dht.store(
                peers_key(self.run_id),
                subkey=self._record.peer_id,
                value=value,
                expiration_time=now + self.record_ttl,
                return_future=True,
            ),
            self.dht.store(
                RUNS_KEY,
                subkey=self.run_id,
                value=self.run_info,
                expiration_time=now + self.record_ttl,
                return_future=True,
            ),
        ]
        for fut in futures:
            await asyncio.to_thread(fut.result, timeout or self.request_timeout)

    async def _announce_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.announce_every)
            if self._record is not None:
                try:
                    await self._store()
                except Exception as e:  # a missed announcement is retried next period
                    logger.warning("announcement failed: %r", e)

    async def on_Announce(self, msg: Announce) -> None:
        """Replace this peer's record; stored now if it is the first or its state changed (ready, finished, or a
        gossip peer turning hungry or fed), else with the next periodic announcement."""
        old, self._record = self._record, msg.record
        if msg.now or old is None or _state(old) != _state(msg.record):
            try:
                await self._store(timeout=3.0 if msg.record.finished else None)
            except Exception as e:  # the periodic announcement retries; a finished peer's record expires anyway
                logger.warning("announcement failed: %r", e)

    async def on_GetPeers(self, msg: GetPeers) -> list[PeerRecord]:
        assert self.dht is not None
        return await asyncio.to_thread(read_peers, self.dht, self.run_id, timeout=self.request_timeout)


def _state(record: PeerRecord) -> tuple[bool, bool, bool]:
    """What other peers act on at once: ready, finished, hungry (a gossip peer's last round found no partner)."""
    return record.ready, record.finished, record.gossip_misses > 0
