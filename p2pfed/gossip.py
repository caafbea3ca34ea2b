"""Gossip averaging: no global barrier. After `inner_steps` local steps a peer averages its parameters with
whichever few live peers are ready at that moment (a group of `averaging.gossip_group_size`), and trains on.

Peers need not be at the same step or hold the same parameters: the averages pull them toward consensus, and a
round without a partner is simply a phase without averaging. Partners are found only among peers looking at the
same moment, so a peer whose phases fall between the others' could miss every round while they pair among
themselves. After each miss it looks for a partner for one more `matchmaking_time` (up to half the round timeout),
which makes its window overlap theirs again, and it announces its misses at once: while some peer is hungry, the
others' groups wait for one more member (Config.group_size), so the pair in step takes it in instead of pairing
alone. The first phase begins once swarm.min_peers peers are ready (Peer._train), so the first windows overlap. The
distance between a peer's parameters and its group's average is recorded each round, so the shrinking spread can be
seen in the report.
"""

from __future__ import annotations

from typing import Any

from p2pfed.actors.messages import FlatParams, GradientsReady, RoundResult, RunRound, SetParams
from p2pfed.phases import PhaseRounds

__all__ = ["GossipRounds"]


class GossipRounds(PhaseRounds):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disagreement: list[float] = []  # per committed round: || theta_local - theta_group_average ||_2
        self.misses = 0  # rounds in a row without a partner

    async def phase_done(self, step: int, inner: int, grads: GradientsReady, *, alone: bool) -> RoundResult | None:
        """Average parameters with a small group (unless alone), then advance by the phase's steps either way."""
        theta = await self.trainer.ask(FlatParams(), timeout=600.0)  # (P,) fp32 copy of this peer's parameters
        rnd: RoundResult | None = RoundResult(committed=False, group_size=0, reason="no partner")
        if not alone:
            local = theta.clone()
            a = self.cfg.averaging
            wait_s = min(a.matchmaking_time * (1 + self.misses), a.round_timeout / 2)
            rnd = await self._until_stop(
                self.averager.ask(
                    RunRound(
                        step=step,
                        flat_grad=theta,
                        weight=grads.samples,
                        fingerprint=self.trainer.fingerprint,
                        wait_s=wait_s,
                    ),
                    timeout=a.round_timeout + a.timeout + 10,
                )
            )
            if rnd is None:
                return None
            if rnd.committed:
                self.disagreement.append(float((local - theta).double().norm()))
            self.misses = 0 if rnd.committed else self.misses + 1
        assert rnd is not None
        await self.trainer.ask(SetParams(step, inner, theta if rnd.committed else None), timeout=600.0)
        return rnd
