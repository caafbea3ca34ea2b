"""What a mode without a per-step barrier does at the end of each phase of local steps.

    rounds = OverlappedRounds(cfg, trainer=trainer, averager=averager, until_stop=until_stop)
    rnd = await rounds.phase_done(step, inner, grads, alone=...)     # None when a stop came first

overlap.py holds DiLoCo with overlap, gossip.py gossip averaging; both start from PhaseRounds.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from p2pfed.actors.messages import GradientsReady, RoundResult, RunRound
from p2pfed.config import Config

__all__ = ["PhaseRounds", "may_reform", "run_round"]

logger = logging.getLogger(__name__)


def may_reform(cfg: Config, rnd: RoundResult, step: int) -> bool:
    """Whether the members left run a failed round again at once, with the same update, instead of losing the step
    (in DiLoCo, every inner step of the phase): when it failed only because members vanished mid-round, enough are
    left, and everyone was at this step. Under secure aggregation a piece of the failed round's result that a member
    holds is a mean that includes the vanished member's update, and the same mean over the members left would give
    that update away: the re-formed round keeps those pieces as they are (secagg.keep_held), so a peer that holds one
    re-forms only if it can say which (held_pieces). Else it stays out, and its step is lost (and, since a re-formed
    masked group must be exactly the members left, the others' too)."""
    left = rnd.group_size - len(rnd.unreachable)
    return (
        not rnd.committed
        and bool(rnd.unreachable)
        and rnd.reason.startswith("incomplete all-reduce")
        and not rnd.diverged
        and rnd.min_group_step == rnd.max_group_step == step
        and left >= cfg.averaging.min_group_size
        and not (cfg.privacy.secure_aggregation and rnd.held and rnd.held_pieces is None)
    )


def may_retry(rnd: RoundResult, step: int) -> bool:
    """Whether a failed round runs again at once with the same update: when every member it missed said it never
    started that all-reduce (alive, but matchmaking put it in another group, e.g. a join request that timed out on its
    side after the leader had counted it), nothing of the result was produced here, and everyone was at this step. The
    missing member is then still looking for a group at this step, and the next one takes it in."""
    return (
        not rnd.committed
        and bool(rnd.unreachable)
        and set(rnd.unreachable) <= set(rnd.not_joined)
        and rnd.reason.startswith("incomplete all-reduce")
        and not rnd.held
        and not rnd.diverged
        and rnd.min_group_step == rnd.max_group_step == step
    )


async def run_round(
    cfg: Config,
    averager: Any,
    request: RunRound,
    *,
    before_reform: Callable[[RoundResult], Awaitable[None]] | None = None,
) -> RoundResult:
    """One round of `request` on `averager`, run again once when a member never started it (may_retry), and
    re-formed once by the members left when members vanished mid-round (may_reform); `before_reform` runs first (e.g.
    to leave the vanished out of the group size)."""
    timeout = cfg.averaging.round_timeout + cfg.averaging.timeout + 10
    rnd: RoundResult = await averager.ask(request, timeout=timeout)
    if may_retry(rnd, request.step):
        logger.warning("round failed (%s); running it again with the same update", rnd.reason)
        rnd = replace(await averager.ask(request, timeout=timeout), retried=True)
    if not may_reform(cfg, rnd, request.step):
        return rnd
    left = tuple(sorted(set(rnd.members) - set(rnd.unreachable)))
    phases = rnd.held_pieces["phases"].values() if rnd.held_pieces else ()
    held = sum(stop - start for phase in phases for start, stop, whole in phase["pieces"] if whole)
    logger.warning(
        "round failed (%s); re-forming it with the %d members left%s", rnd.reason, len(left),
        f", keeping the {held} values of its result this peer holds" if held else "",
    )  # fmt: skip
    if before_reform is not None:
        await before_reform(rnd)
    again: RoundResult = await averager.ask(replace(request, reform_of=left, held=rnd.held_pieces), timeout=timeout)
    return replace(again, reformed=True)


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
