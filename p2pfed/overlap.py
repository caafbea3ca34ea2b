"""DiLoCo with overlap: a phase's pseudo-gradient is all-reduced while the next phase trains.

At the end of phase r+1 the round of phase r is collected: its average moves the shared point theta_start (outer
Nesterov step), and the model continues from theta_start minus phase r+1's own change, which then goes out in turn.
The outer update so lands one phase late, and no peer waits for the network between phases.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import torch

from p2pfed.actors.messages import ApplyOuter, GradientsReady, RoundResult, RunRound
from p2pfed.phases import PhaseRounds, run_round

__all__ = ["OverlappedRounds"]

T = TypeVar("T")


class OverlappedRounds(PhaseRounds):
    """Holds the round in flight: (pseudo-gradient, the Averager's reply to come)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: tuple[torch.Tensor, asyncio.Future[RoundResult]] | None = None

    async def phase_done(self, step: int, inner: int, grads: GradientsReady, *, alone: bool) -> RoundResult | None:
        """Collect the previous phase's round (None if a stop came first), apply it with this phase carried on top,
        and start this phase's round. The first phase has no earlier round: group_size 0."""
        delta = grads.flat_grad.clone()  # (P,) this phase's pseudo-gradient; the trainer reuses flat_grad
        rnd: RoundResult | None = RoundResult(committed=True, group_size=0)
        averaged = None
        if self.pending is not None:
            averaged, rnd = await self._collect()
            if rnd is None:
                return None
        await self.trainer.ask(ApplyOuter(step, inner, averaged, carry=delta, samples=grads.samples), timeout=600.0)
        if alone:  # nobody to average with: the phase's own change is the "average"
            solo: asyncio.Future[RoundResult] = asyncio.get_running_loop().create_future()
            solo.set_result(RoundResult(committed=True, group_size=1))
            self.pending = (delta, solo)
        else:
            request = RunRound(
                step=self.trainer.step, flat_grad=delta, weight=grads.samples, fingerprint=self.trainer.fingerprint
            )
            self.pending = (delta, asyncio.ensure_future(run_round(self.cfg, self.averager, request)))
        return rnd

    async def settle(self) -> RoundResult | None:
        """End of the run: wait for the last round and land on the shared point (nothing carried)."""
        if self.pending is None:
            return None
        averaged, rnd = await self._collect()
        if rnd is None:
            return None
        await self.trainer.ask(ApplyOuter(self.trainer.step, 0, averaged, carry=None), timeout=600.0)
        return rnd

    async def drop(self) -> None:
        """Before this peer's state is replaced with the swarm's: let the round in flight end and forget it."""
        if self.pending is not None:
            await self._collect()

    async def _collect(self) -> tuple[torch.Tensor | None, RoundResult | None]:
        """Wait for the round in flight and forget it: (the averaged pseudo-gradient if it committed, else None;
        the round's result, or None if a stop came first)."""
        assert self.pending is not None
        delta, task = self.pending
        self.pending = None
        rnd = await self._until_stop(task)
        return (delta if rnd is not None and rnd.committed else None), rnd
