"""`uint8`: uniform 8-bit quantization with one (min, scale) pair per chunk, a quarter of fp32's bytes plus 8 bytes
per chunk.

    payload = Uint8(chunk=1024, rounding="stochastic", seed=peer_seed).compress(x, round=r)

Each chunk of `chunk` elements maps [min, max] onto the 256 levels min + q * scale, scale = (max - min) / 255. The
range is the chunk's true range: nothing is clamped, so an outlier costs its chunk resolution but is itself kept
(hivemind's Uniform8BitQuantization clamps to mean ± 3 std and loses the tails of heavy-tailed updates).

Error bound, per element of a chunk with scale s, up to a few fp32 ulps of the chunk's largest magnitude:
- rounding="nearest": |x - x̂| <= s / 2, deterministic, biased toward the nearest level;
- rounding="stochastic" (default): |x - x̂| < s and E[x̂] = x: q rounds up with probability equal to the fraction
  it lies above the lower level, drawn from a generator seeded from (seed, round), so a round is reproducible.
  Give each peer its own seed: its rounding noise is then independent of the others' and shrinks in the mean.

Not `linear`: each peer's (min, scale) depend on its own data, so payloads of different peers do not share a grid.
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
    check_int,
    check_round,
    flat32,
    pack,
    seeded_generator,
    unpack,
)

__all__ = ["Uint8"]

LEVELS = 255  # q in 0..255


@dataclass(kw_only=True)
class Uint8(Compressor):
    """Options: chunk (elements per (min, scale) pair), rounding ("stochastic" or "nearest"), seed."""

    chunk: int = 1024
    rounding: str = "stochastic"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("chunk", self.chunk, minimum=1)
        check_choice("rounding", self.rounding, ("stochastic", "nearest"))
        check_int("seed", self.seed, minimum=0)

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        check_round(round)
        flat = flat32(x)
        numel, chunks = flat.numel(), math.ceil(flat.numel() / self.chunk)
        # Pad with the last value, which lies inside the last chunk's range and so leaves its (min, max) unchanged.
        padded = torch.cat([flat, flat[-1:].expand(chunks * self.chunk - numel)]).view(chunks, self.chunk)
        low = padded.amin(dim=1)  # (chunks,)
        scale = (padded.amax(dim=1) - low) / LEVELS  # (chunks,)
        # A constant chunk has scale 0: every q is 0 and low alone restores it.
        t = (padded - low[:, None]) / torch.where(scale > 0, scale, 1.0)[:, None]  # (chunks, chunk) in [0, 255]
        if self.rounding == "nearest":
            q = torch.round(t)
        else:
            noise = torch.rand(t.shape, generator=seeded_generator(self.seed, round, "uint8"))
            q = torch.floor(t + noise)
        # The clamp only catches fp32 rounding at the ends of the range (t a hair above 255); it never cuts values.
        levels = q.clamp_(0, LEVELS).to(torch.uint8).view(-1)[:numel]  # (numel,)
        return Payload(pack(low, scale, levels), header=(self.chunk,))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        chunks = math.ceil(numel / self.chunk)
        low, scale, levels = unpack(
            payload, (self.chunk,), (np.float32, chunks), (np.float32, chunks), (np.uint8, numel)
        )
        q = torch.zeros(chunks * self.chunk, dtype=torch.float32)
        q[:numel] = levels  # (chunks * chunk,), the last chunk padded with zeros
        # Broadcast each chunk's (min, scale) over its row instead of gathering them per element (3x faster).
        return (q.view(chunks, self.chunk) * scale[:, None] + low[:, None]).view(-1)[:numel]
