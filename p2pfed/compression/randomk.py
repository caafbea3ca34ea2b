"""`randomk`: keep a random `ratio` of the coordinates, the same ones on every peer, without sending their indices.

    payload = RandomK(ratio=0.01, seed=run_seed).compress(x, round=r)     # 4 bytes per kept coordinate

The k = round(ratio * numel) coordinates come from a torch.Generator seeded from (seed, round): every peer with the
same seed picks the same ones for a round, and a new round picks new ones. The draw is stratified: the vector is cut
into k blocks of near-equal size (floor(numel / k) or one more) and one coordinate is drawn uniformly from each, so a
round costs O(k), not the O(numel) of a full permutation (2.5 s per draw at 25M elements here), and every coordinate
is kept with probability 1 / (its block's size), about k / numel. That makes the compressor `linear` with a
shared basis: the group can sum, and secure aggregation can mask, the k kept values directly.

Error bound: the kept coordinates are exact (times their block's size when `scale` is on) and the rest are 0, so
||x - x̂||² = ||x||² - ||x_kept||², which is about (1 - k / numel) ||x||² in expectation over the draw. With `scale`
on, x̂ is unbiased (E[x̂] = x) but its variance grows by about numel / k; it is off by default because error
feedback, the normal partner, wants the unscaled, contracting form.
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
        self._last: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def size(self, numel: int) -> int:
        return keep_count(self.ratio, numel)

    def indices(self, numel: int, *, round: int) -> torch.Tensor:
        """The (k,) sorted int64 coordinates kept in `round`, one per block; the same on every peer with this seed."""
        return self._draw(numel, round)[0]

    def _draw(self, numel: int, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, their blocks' sizes), both (k,); the last draw is kept, as encode and decode ask for it twice."""
        check_round(round)
        if self._last is not None and self._last[0] == (numel, round):
            return self._last[1]
        k = self.size(numel)
        starts = torch.arange(k + 1, dtype=torch.int64) * numel // k  # (k + 1,) block boundaries, nondecreasing
        sizes = starts[1:] - starts[:-1]  # (k,) each >= 1 since k <= numel
        offsets = torch.rand(k, generator=seeded_generator(self.seed, round, "randomk"), dtype=torch.float64) * sizes
        chosen = starts[:-1] + offsets.long().clamp_(max=sizes - 1)  # (k,) sorted: one per block, in block order
        self._last = ((numel, round), (chosen, sizes))
        return chosen, sizes

    def encode(self, x: torch.Tensor, *, round: int) -> torch.Tensor:
        chosen, sizes = self._draw(x.numel(), round)
        values = x[chosen]  # (k,)
        return values * sizes.to(values.dtype) if self.scale else values

    def decode(self, values: torch.Tensor, *, numel: int, round: int) -> torch.Tensor:
        out = torch.zeros(numel, dtype=torch.float32)
        out[self.indices(numel, round=round)] = values
        return out
