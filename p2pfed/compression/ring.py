"""`Ring`: elements of the ring Z_2^b, bit-packed to b bits each; what a secure-aggregation round puts on the wire.

    payload = Ring(bits=10).compress(masked, round=r)     # (numel,) int32 carrying values in [0, 2**10)
    total = Ring(bits=10).decompress(payload, numel=n, round=r)

Not a user choice: p2pfed/secagg.py uses it for masked fixed-point updates. A reducer adds the members' elements
modulo 2^b (`reduce`), ignoring weights (the members scaled their updates by their weights before masking), and
replies with the sum, so the masks cancel exactly; given its own clear values, it takes them out of the ring sum,
decodes the other members' sum, and adds them back (`reduced`). Lossless for values in [0, 2^b); each element is
carried in the bits of an int32 (its uint32 value), so any b up to 32 works.

Wire form: the low b // 8 bytes of every element, then one bit plane (numel / 8 bytes) per remaining bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.compression.base import Compressor, Payload, check_int, check_round

__all__ = ["Ring"]


@dataclass(kw_only=True)
class Ring(Compressor):
    """bits: b, the ring's width (1-32). unit: when set, a reducer's result is the sum decoded to fp32 (its signed
    value times `unit`) rather than the ring elements, for replies in another codec."""

    bits: int
    unit: float | None = None
    dtype = torch.int32

    def __post_init__(self) -> None:
        check_int("bits", self.bits, minimum=1)
        if self.bits > 32:
            raise ValueError(f"bits must be at most 32, got {self.bits}")

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1

    def nbytes(self, numel: int) -> int:
        return numel * (self.bits // 8) + (self.bits % 8) * ((numel + 7) // 8)

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        check_round(round)
        if self.bits == 32:  # the int32 bytes are the wire form: no copy
            return Payload(_u32(x).view(np.uint8).data.toreadonly(), header=(x.numel(), 32))
        u = _u32(x) & np.uint32(self.modulus_mask)  # (numel,)
        whole, rest = divmod(self.bits, 8)
        numel = u.size
        out = np.empty(self.nbytes(numel), dtype=np.uint8)
        lanes = u.view(np.uint8).reshape(numel, 4)  # little-endian: lane 0 is the lowest byte
        out[: numel * whole].reshape(numel, whole)[:] = lanes[:, :whole]
        if rest:
            top = lanes[:, whole]
            plane = (numel + 7) // 8
            for k in range(rest):
                start = numel * whole + k * plane
                out[start : start + plane] = np.packbits((top >> k) & 1, bitorder="little")
        return Payload(out.data, header=(numel, self.bits))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        if payload.header != (numel, self.bits):
            raise ValueError(f"ring payload header {payload.header} does not match ({numel}, {self.bits})")
        if len(payload.data) != self.nbytes(numel):
            raise ValueError(f"ring payload has {len(payload.data)} bytes, expected {self.nbytes(numel)}")
        data = np.frombuffer(payload.data, dtype=np.uint8)
        if self.bits == 32:
            ints = data.view(np.int32)
            return torch.from_numpy(ints if ints.flags.writeable else ints.copy())
        whole, rest = divmod(self.bits, 8)
        lanes = np.zeros((numel, 4), dtype=np.uint8)
        lanes[:, :whole] = data[: numel * whole].reshape(numel, whole)
        if rest:
            plane = (numel + 7) // 8
            top = np.zeros(numel, dtype=np.uint8)
            for k in range(rest):
                start = numel * whole + k * plane
                top |= np.unpackbits(data[start : start + plane], count=numel, bitorder="little") << k
            lanes[:, whole] = top
        return torch.from_numpy(lanes.reshape(-1).view(np.int32))

    def reduce(self, total: torch.Tensor | None, piece: torch.Tensor, weight: float, *, owned: bool) -> torch.Tensor:
        if total is None:
            return piece if owned else piece.clone()
        np.add(_u32(total), _u32(piece), out=_u32(total))  # wraps modulo 2^32, hence modulo 2^b
        return total

    def reduced(self, total: torch.Tensor, weight: float, *, clear: torch.Tensor | None = None) -> torch.Tensor:
        """The sum modulo 2^b, or decoded to fp32 with `unit`. `clear` (int32, with `unit`): the reducer's own
        values, which its element in `total` carries masked like everyone's. They are taken out before decoding, so
        the ring needs to hold only the other members' sum, and added back after."""
        u = _u32(total)
        if clear is not None:
            if self.unit is None:
                raise ValueError("a ring sum takes the reducer's clear values only when it decodes them (unit)")
            np.subtract(u, _u32(clear), out=u)
        np.bitwise_and(u, np.uint32(self.modulus_mask), out=u)
        if self.unit is None:
            return total
        # The reducer owns its sum: sign-extended in place, then scaled in fp32 where that is exact (|sum| < 2^24)
        values = _sign_extend_(u, self.bits)
        own = None if clear is None else _u32(clear).view(np.int32)
        if self.bits + (own is not None) > 24:  # sums beyond fp32's 24-bit integers: exact in fp64 first
            wide = values.astype(np.int64)
            if own is not None:
                wide += own
            return torch.from_numpy((wide.astype(np.float64) * self.unit).astype(np.float32))
        if own is not None:
            values += own  # |others' sum + own| < 2^b: one bit more than the ring, well inside int32
        out = values.astype(np.float32)
        out *= np.float32(self.unit)
        return torch.from_numpy(out)


def signed(total: torch.Tensor, *, bits: int) -> np.ndarray:
    """Ring elements (int32 carrying values in [0, 2^b)) as the signed integers they stand for, in fp64 (exact)."""
    return _sign_extend_(_u32(total).copy(), bits).astype(np.float64)


def _sign_extend_(u: np.ndarray, bits: int) -> np.ndarray:
    """Elements of Z_2^b (uint32, in place) as signed int32: the top ring bit is the sign. Returns the int32 view."""
    shift = np.uint32(32 - bits)
    np.left_shift(u, shift, out=u)
    values = u.view(np.int32)
    np.right_shift(values, shift, out=values)
    return values


def _u32(t: torch.Tensor) -> np.ndarray:
    """The uint32 view of an int32 tensor's memory (no copy)."""
    if t.dtype != torch.int32:
        raise ValueError(f"ring elements travel as int32, got {t.dtype}")
    return t.detach().reshape(-1).numpy().view(np.uint32)
