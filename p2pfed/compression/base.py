"""The compressor interface: what the averager calls to put one peer's flat fp32 update on the wire and back.

Every peer compresses its own vector, the group reduces, and the result is the mean across peers:

    payload = compressor.compress(update, round=r)          # Payload: wire bytes + a few layout ints
    restored = compressor.decompress(payload, numel=update.numel(), round=r)   # (numel,) fp32, on the CPU

A compressor is `linear` when its payloads live in a basis that every peer shares for a given round (shared-seed
random-k, fp32 as is): then the mean of the payload values decompresses to the mean of the decompressed vectors, so
the group can reduce, and secure aggregation can mask, in the compressed domain. `LinearCompressor` is the base for
those. Quantizers with a per-peer scale (uint8) and data-dependent selections (top-k) are not linear.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["Compressor", "LinearCompressor", "Payload", "RoundingBytes", "flat32", "keep_count", "seeded_generator"]


@dataclass(frozen=True, slots=True)
class Payload:
    """One peer's compressed update: `data` is the wire form (packed numpy buffers, native little-endian order);
    `header` holds a few layout ints (e.g. kept count, matrix shape) so a receiver can reject a payload from a peer
    configured differently instead of misreading it. A linear payload's `data` is a read-only view of the encoded
    tensor's memory (no copy of a 100 MB vector): it stays valid while that tensor is left unchanged."""

    data: bytes | bytearray | memoryview
    header: tuple[int, ...] = ()

    HEADER_ITEM_BYTES: ClassVar[int] = 4  # header ints go on the wire as int32

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.HEADER_ITEM_BYTES * len(self.header)


class Compressor(ABC):
    """Compresses one flat fp32 vector per round. Subclasses are keyword-only dataclasses of their options."""

    # True when payloads of one round share a basis across peers, so that averaging them equals averaging the
    # decompressed vectors (see LinearCompressor.average).
    linear: bool = False
    # True when a payload's data is the vector's fp32 values themselves, header (numel,): a receiver may read the
    # bytes straight into the tensor they belong to.
    raw: bool = False
    # True when a payload carries every element of the vector on its own (fp32, fp16, 8-bit levels), so a running
    # mean can travel through it hop by hop (p2pfed/ring.py).
    elementwise: bool = False
    # What compress takes and decompress returns: fp32 vectors, except for ring elements (compression/ring.py).
    dtype: ClassVar[torch.dtype] = torch.float32

    @abstractmethod
    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        """Compress `x` (any shape, flattened; finite values) for averaging round `round`."""

    @abstractmethod
    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        """The (numel,) fp32 CPU vector that `payload` stands for; ValueError when the payload does not fit."""

    def reduce(self, total: torch.Tensor | None, piece: torch.Tensor, weight: float, *, owned: bool) -> torch.Tensor:
        """A reducer's running sum with one more member's decoded piece: weight * piece added. `owned`: the piece's
        memory may be kept and written."""
        if total is None:
            return piece.mul_(weight) if owned else piece * weight
        return total.add_(piece, alpha=weight)

    def reduced(self, total: torch.Tensor, weight: float, *, clear: torch.Tensor | None = None) -> torch.Tensor:
        """The reducer's result from its running sum and the members' total weight (here the weighted mean).
        `clear`: the reducer's own values, which only ring sums take (compression/ring.py)."""
        if clear is not None:
            raise ValueError(f"{type(self).__name__} sums take no clear values apart")
        return total.div_(weight) if weight > 0 else total.zero_()


class LinearCompressor(Compressor):
    """A compressor that maps x to k coordinates in a basis shared by every peer of a round, and back, linearly:
    decode(mean_i encode(x_i)) == mean_i decode(encode(x_i)). The wire form is the k coordinates as fp32."""

    linear = True

    @abstractmethod
    def size(self, numel: int) -> int:
        """k: how many coordinates a vector of numel elements has in the shared basis."""

    @abstractmethod
    def encode(self, x: torch.Tensor, *, round: int) -> torch.Tensor:
        """(k,) fp32 coordinates of flat `x` in this round's shared basis."""

    @abstractmethod
    def decode(self, values: torch.Tensor, *, numel: int, round: int) -> torch.Tensor:
        """(numel,) fp32 vector with the (k,) coordinates `values` in this round's shared basis."""

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        values = self.encode(flat32(x), round=round)  # (k,)
        return Payload(view_bytes(values), header=(values.numel(),))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        k = self.size(numel)
        (values,) = unpack(payload, (k,), (np.float32, k))
        return self.decode(values, numel=numel, round=round)

    def values(self, payload: Payload) -> torch.Tensor:
        """The (k,) fp32 coordinates a payload carries: what an all-reduce sums and secure aggregation masks."""
        if len(payload.header) != 1:
            raise ValueError(f"a linear payload's header is (k,), got {payload.header}")
        return unpack(payload, payload.header, (np.float32, payload.header[0]))[0]

    def average(self, payloads: Sequence[Payload]) -> Payload:
        """Mean of several peers' payloads of one round, taken in the compressed domain."""
        values = torch.stack([self.values(p) for p in payloads]).mean(dim=0)  # (peers, k) -> (k,)
        return Payload(pack(values), header=(values.numel(),))


def flat32(x: torch.Tensor) -> torch.Tensor:
    """x as a flat fp32 CPU tensor (a view when it already is one; compressors never write into it)."""
    return x.detach().reshape(-1).to(device="cpu", dtype=torch.float32)


def pack(*tensors: torch.Tensor) -> bytes:
    return b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors)


def view_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of one fp32 tensor without a copy (a copy only when it is not a contiguous CPU tensor)."""
    array = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return array.data.cast("B").toreadonly()


def unpack(payload: Payload, header: tuple[int, ...], *layout: tuple[Any, int]) -> list[torch.Tensor]:
    """Split payload.data into tensors of the given (numpy dtype, count), after checking header and length."""
    if payload.header != header:
        raise ValueError(f"payload header {payload.header} does not match this compressor's {header}")
    expected = sum(np.dtype(dtype).itemsize * count for dtype, count in layout)
    if len(payload.data) != expected:
        raise ValueError(f"payload has {len(payload.data)} bytes, expected {expected}")
    out, offset = [], 0
    for dtype, count in layout:
        array = np.frombuffer(payload.data, dtype=dtype, count=count, offset=offset)
        # A received payload is a bytearray: its arrays can be used in place. Over bytes or a view they are read-only.
        out.append(torch.from_numpy(array if array.flags.writeable else array.copy()))
        offset += array.nbytes
    return out


class RoundingBytes:
    """Stochastic rounding in integers, from a ChaCha20 stream under `key` (32 bytes):

        rounding = RoundingBytes(key)
        q = rounding.floor_(torch.round(256 * y).to(torch.int32))    # floor((256 y + u) / 256), u uniform in 0..255

    y comes out floor(y) or floor(y) + 1, the latter with probability its fractional part (to 1/256): unbiased to
    1/512, one keystream byte per element instead of a float draw. The stream goes on from call to call."""

    def __init__(self, key: bytes) -> None:
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._noise = np.empty(0, dtype=np.uint8)

    def floor_(self, q: torch.Tensor) -> torch.Tensor:
        """In place on int32 `q` (256 y, rounded), returned."""
        count = q.numel()
        if self._noise.size < count:
            self._noise = np.empty(count, dtype=np.uint8)
        noise = self._noise[:count]
        self._stream.update_into(bytes(count), noise.data)
        return q.add_(torch.from_numpy(noise).view_as(q)).bitwise_right_shift_(8)


def seeded_generator(seed: int, round: int, salt: str) -> torch.Generator:
    """A CPU generator that every peer derives identically from (seed, round); `salt` keeps compressors apart.
    Hashing, rather than seed * K + round, keeps distinct (seed, round) pairs from colliding."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{round}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def keep_count(ratio: float, numel: int) -> int:
    """How many of numel coordinates a ratio keeps: nearest integer, at least one, at most numel."""
    return min(numel, max(1, math.floor(ratio * numel + 0.5)))


def check_ratio(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_round(round: int) -> None:
    check_int("round", round, minimum=0)
