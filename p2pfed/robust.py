"""What a reducer does with the members' copies of one piece before they reach anyone's model.

    guard = Guard(max_norm=1e4)
    reason = guard.check(piece)                     # "" or why this copy is dropped (not finite, over the bound)
    rule = make_rule("trimmed_mean", trim_ratio=0.2)
    mean = rule.combine(pieces)                     # (size,) from the copies that passed the guard

Every copy a reducer receives goes through the Guard first: a copy with a NaN or an infinity, or whose L2 norm is
above `averaging.max_update_norm`, is dropped (the piece's mean is taken over the other members, re-weighted), and
the round reports how many copies it dropped. A piece is part of an update, so its norm is at most the update's: a
copy over the bound comes from an update over the bound, and an honest update within the bound is never dropped.

The rule combines what passed. `mean` (the default) is the samples-weighted mean, reduced as the copies arrive.
The robust rules need every copy of a piece at once, and treat members alike (a member's sample count is what a
Byzantine member would lie about):

| rule          | per coordinate / per piece                                                                       |
|---------------|--------------------------------------------------------------------------------------------------|
| trimmed_mean  | drop the k = floor(trim_ratio * n) largest and k smallest values of each coordinate, mean the rest |
| centered_clip | from the coordinate-wise median v, iterate v += mean_i clip(x_i - v, radius) (Karimireddy et al., |
|               | 2021), clipping each member's difference to L2 norm `clip_radius` over the piece                  |

The robust rules run per piece (1M elements), so centered clipping bounds each member's pull on each piece rather
than on its whole update: a member's total pull is at most radius times its number of pieces.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CenteredClip", "Guard", "Rule", "TrimmedMean", "all_finite", "make_rule"]


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of `x` is finite: one norm pass (about 10x faster than isfinite().all() on CPU); only
    a norm that is not finite (a NaN or an infinity, or large values whose squares overflow) is checked element by
    element."""
    if math.isfinite(float(torch.linalg.vector_norm(x))):
        return True
    return bool(torch.isfinite(x).all())


@dataclass(frozen=True, slots=True)
class Guard:
    """Drops a member's copy of a piece that is not finite or whose L2 norm exceeds `max_norm` (None: no bound)."""

    max_norm: float | None = None

    def check(self, piece: torch.Tensor) -> str:
        # in the piece's own precision first (5x faster than float64 on CPU); one that overflows there is measured
        # again in float64, so that large finite values are told apart from NaN and infinities
        norm = float(torch.linalg.vector_norm(piece))
        if not math.isfinite(norm):
            norm = float(torch.linalg.vector_norm(piece, dtype=torch.float64))
        if not math.isfinite(norm):
            return "not finite"
        if self.max_norm is not None and norm > self.max_norm:
            return f"norm {norm:.3g} over averaging.max_update_norm {self.max_norm:g}"
        return ""


class Rule(ABC):
    """A robust way to combine the copies of one piece (the plain weighted mean needs no class: it is the sum)."""

    name: str

    @abstractmethod
    def combine(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """(size,) fp32 from n >= 1 copies of shape (size,)."""


@dataclass(frozen=True, slots=True)
class TrimmedMean(Rule):
    trim_ratio: float = 0.2
    name = "trimmed_mean"

    def combine(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        n = len(pieces)
        k = min(int(self.trim_ratio * n), (n - 1) // 2)  # always keep at least one value per coordinate
        stacked = torch.stack(list(pieces))  # (n, size)
        if k == 0:
            return stacked.mean(dim=0)
        return stacked.sort(dim=0).values[k : n - k].mean(dim=0)


@dataclass(frozen=True, slots=True)
class CenteredClip(Rule):
    radius: float = 1.0
    iterations: int = 3
    name = "centered_clip"

    def combine(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(pieces))  # (n, size)
        v = stacked.median(dim=0).values  # (size,): a start no single member can move far
        for _ in range(self.iterations):
            diff = stacked - v  # (n, size)
            norms = torch.linalg.vector_norm(diff, dim=1, keepdim=True)  # (n, 1)
            scale = torch.clamp(self.radius / norms.clamp_min(1e-30), max=1.0)
            v = v + (diff * scale).mean(dim=0)
        return v


def make_rule(name: str, *, trim_ratio: float = 0.2, clip_radius: float = 1.0) -> Rule | None:
    """The rule for `averaging.aggregation`; None for the plain weighted mean."""
    if name == "mean":
        return None
    if name == "trimmed_mean":
        return TrimmedMean(trim_ratio=trim_ratio)
    if name == "centered_clip":
        return CenteredClip(radius=clip_radius)
    raise ValueError(f"unknown averaging.aggregation {name!r}")
