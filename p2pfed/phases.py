"""What a mode without a per-step barrier does at the end of each phase of local steps.

    rounds = OverlappedRounds(cfg, trainer=trainer, averager=averager, until_stop=until_stop)
    rnd = await rounds.phase_done(step, inner, grads, alone=...)     # None when a stop came first

overlap.py holds DiLoCo with overlap, gossip.py gossip averaging; both start from PhaseRounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from p2pfed.actors.messages import GradientsReady, RoundResult
from p2pfed.config import Config

__all__ = ["PhaseRounds"]


class PhaseRounds(ABC):
    """Holds the peer's trainer and averager actors, and the peer's `until_stop` (None once a stop is requested)."""

    def __init__(
        self,
        cfg: Config,
        *,
        trainer: Any,
        averager: Any,
        until_stop: Callable[[Awaitable[Any]], Awaitable[Any]],
    ) -> None:
        self.cfg, self.trainer, self.averager, self._until_stop = cfg, trainer, averager, until_stop

    @abstractmethod
    async def phase_done(self, step: int, inner: int, grads: GradientsReady, *, alone: bool) -> RoundResult | None:
        """The phase of `inner` steps from `step` is computed: average it (unless alone) and apply what is due."""
