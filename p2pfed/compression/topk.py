"""`topk`: keep the `ratio` of coordinates with the largest magnitude, sent as int32 indices plus values.

    payload = TopK(ratio=0.01, value_dtype="fp16").compress(x, round=r)    # k * (4 + 2) bytes

Error bound: the kept coordinates are exact (fp32 values) or within fp16 rounding, 2**-11 relative (fp16 values;
|x| > 65504 overflows to inf, which the averager drops); the rest are 0. Among all k-sparse vectors, x̂ is the
closest to x: ||x - x̂||² = ||x||² - (sum of the k largest x_i²) <= (1 - k / numel) ||x||², which is the
contraction error feedback needs. Ties at the k-th magnitude are broken by torch.topk, not by index.

Selection (`largest_magnitudes`): torch.topk over a whole large vector is slow on the CPU (about 0.5 s for 25M
elements on one core here); the selection first keeps the candidates at or above a threshold read off a random
sample of the magnitudes, set a few standard deviations below the k-th largest's estimate, in one pass, and runs
topk over those. Whenever at least k candidates pass, the k largest are among them, so the result is the same k
coordinates; when fewer pass (a sample far off the vector's distribution), it runs topk over everything.

Not `linear`: each peer picks its own coordinates, so payloads must be decompressed before they are averaged, and
the mean of k-sparse vectors is up to (peers * k)-sparse. Indices are int32, so numel must be below 2**31.
"""

from __future__ import annotations

import math
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

__all__ = ["TopK", "largest_magnitudes"]

SAMPLE = 1 << 16  # at most this many magnitudes drawn to place the candidates' threshold, at least MIN_SAMPLE
MIN_SAMPLE = 1 << 12
SIGMAS = 6.0  # how far below the k-th largest's estimate the threshold sits, in binomial standard deviations

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
        chosen = largest_magnitudes(flat, k)  # (k,), sorted for an in-order scatter
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


def candidate_threshold(magnitudes: torch.Tensor, k: int) -> float:
    """A magnitude that about k (1 + a few sigma) of the numel magnitudes reach: the k-th largest's estimate from a
    random sample, lowered by SIGMAS binomial standard deviations of the count above it."""
    numel = magnitudes.numel()
    size = max(MIN_SAMPLE, min(SAMPLE, numel // 64))
    draws = torch.randint(numel, (size,), generator=torch.Generator().manual_seed(numel ^ k))
    expected = size * k / numel  # sampled magnitudes expected at or above the k-th largest
    above = min(size, math.ceil(expected + SIGMAS * math.sqrt(expected)) + 8)
    return float(magnitudes[draws].kthvalue(size - above + 1).values)


def largest_magnitudes(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int64 indices of the k entries of flat fp32 `flat` with the largest magnitude (ties broken by
    torch.topk)."""
    magnitudes = flat.abs()
    if 64 * MIN_SAMPLE <= flat.numel() and 8 * k <= flat.numel():
        threshold = candidate_threshold(magnitudes, k)
        candidates = torch.from_numpy(np.flatnonzero(magnitudes.numpy() >= threshold))  # (c,) int64, ascending
        if candidates.numel() >= k:  # the k largest are all >= the k-th largest >= threshold: all candidates
            best = torch.zeros(candidates.numel(), dtype=torch.bool)
            best[magnitudes[candidates].topk(k, sorted=False).indices] = True
            return candidates[best]  # in the candidates' ascending order
    return magnitudes.topk(k, sorted=False).indices.sort().values
