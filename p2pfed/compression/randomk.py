"""`randomk`: keep a random `ratio` of the coordinates, the same ones on every peer, without sending their indices.

    payload = RandomK(ratio=0.01, seed=run_seed).compress(x, round=r)     # 4 bytes per kept coordinate

The k = round(ratio * numel) coordinates come from a torch.Generator seeded from (seed, round): every peer with the
same seed picks the same ones for a round, and a new round picks new ones. That makes the compressor `linear` with a
shared basis: the group can sum, and secure aggregation can mask, the k kept values directly.

Error bound: the kept coordinates are exact (times numel / k when `scale` is on) and the rest are 0, so
||x - x̂||² = ||x||² - ||x_kept||², which is (1 - k / numel) ||x||² in expectation over the draw. With `scale` on,
x̂ is unbiased (E[x̂] = x) but its variance grows by numel / k; it is off by default because error feedback, the
normal partner, wants the unscaled, contracting form. Drawing the indices costs an O(numel) permutation per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pfed.compression.base import (
    LinearCompressor,
    check_flag,
    check_int,
    check_ratio,
    check_round,
    keep_count,
    seeded_generator,
)

__all__ = ["RandomK"]


@dataclass(kw_only=True)
class RandomK(LinearCompressor):
    """Options: ratio (share of coordinates kept, in (0, 1]), seed (shared by the group), scale (unbiased form)."""

    ratio: float = 0.01
    seed: int = 0
    scale: bool = False

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_int("seed", self.seed, minimum=0)
        check_flag("scale", self.scale)

    def size(self, numel: int) -> int:
        return keep_count(self.ratio, numel)

    def indices(self, numel: int, *, round: int) -> torch.Tensor:
        """The (k,) sorted int64 coordinates kept in `round`; the same on every peer with this seed."""
        check_round(round)
        generator = seeded_generator(self.seed, round, "randomk")
        chosen = torch.randperm(numel, generator=generator)[: self.size(numel)]
        return chosen.sort().values  # sorted: gathers and scatters walk memory in order

    def encode(self, x: torch.Tensor, *, round: int) -> torch.Tensor:
        values = x[self.indices(x.numel(), round=round)]  # (k,)
        return values * (x.numel() / values.numel()) if self.scale else values

    def decode(self, values: torch.Tensor, *, numel: int, round: int) -> torch.Tensor:
        out = torch.zeros(numel, dtype=torch.float32)
        out[self.indices(numel, round=round)] = values
        return out
