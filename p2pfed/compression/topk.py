"""`topk`: keep the `ratio` of coordinates with the largest magnitude, sent as int32 indices plus values.

    payload = TopK(ratio=0.01, value_dtype="fp16").compress(x, round=r)    # k * (4 + 2) bytes

Error bound: the kept coordinates are exact (fp32 values) or within fp16 rounding, 2**-11 relative (fp16 values;
|x| > 65504 overflows to inf, which the averager drops); the rest are 0. Among all k-sparse vectors, x̂ is the
closest to x: ||x - x̂||² = ||x||² - (sum of the k largest x_i²) <= (1 - k / numel) ||x||², which is the
contraction error feedback needs. Ties at the k-th magnitude are broken by torch.topk, not by index.

Not `linear`: each peer picks its own coordinates, so payloads must be decompressed before they are averaged, and
the mean of k-sparse vectors is up to (peers * k)-sparse. Indices are int32, so numel must be below 2**31.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.compression.base import (
    Compressor,
    Payload,
    check_choice,
    check_ratio,
    check_round,
    flat32,
    keep_count,
    pack,
    unpack,
)

__all__ = ["TopK"]

VALUE_DTYPES = {"fp32": (torch.float32, np.float32), "fp16": (torch.float16, np.float16)}


@dataclass(kw_only=True)
class TopK(Compressor):
    """Options: ratio (share of coordinates kept, in (0, 1]), value_dtype ("fp32" or "fp16" on the wire)."""

    ratio: float = 0.01
    value_dtype: str = "fp32"

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_choice("value_dtype", self.value_dtype, tuple(VALUE_DTYPES))

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        check_round(round)
        flat = flat32(x)
        if flat.numel() >= 2**31:
            raise ValueError(f"topk sends int32 indices, so numel must be < 2**31, got {flat.numel()}")
        k = keep_count(self.ratio, flat.numel())
        chosen = flat.abs().topk(k, sorted=False).indices.sort().values  # (k,), sorted for an in-order scatter
        kept = flat[chosen].to(VALUE_DTYPES[self.value_dtype][0])  # (k,)
        return Payload(pack(chosen.to(torch.int32), kept), header=(k,))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        k = keep_count(self.ratio, numel)
        chosen, kept = unpack(payload, (k,), (np.int32, k), (VALUE_DTYPES[self.value_dtype][1], k))
        if k and (int(chosen.min()) < 0 or int(chosen.max()) >= numel):
            raise ValueError(f"topk payload has indices outside [0, {numel})")
        out = torch.zeros(numel, dtype=torch.float32)
        out[chosen.long()] = kept.to(torch.float32)
        return out
