"""Cloud-aware all-reduce: average inside each cloud first, then one delegate per cloud across clouds, then back.

    members = [Member(peer, cloud="aws", weight=8.0, share=1.0), ...]     # the group, in its agreed order
    mean, stats = await hierarchical_allreduce(butterfly, tag, members, me, vector, codec=..., round=r, timeout=t)

1. Inside each cloud, its members all-reduce over the fast local links: every member gets the cloud's weighted mean.
2. One delegate per cloud (its first member, in group order, that accepts streams) all-reduces the cloud means
   across clouds, each weighted by its cloud's total weight: the delegates now hold the group's weighted mean.
3. Each delegate broadcasts that mean to its cloud (members pull it, so dial-out-only members get it too).

The result is the same weighted mean a flat all-reduce gives (up to fp32 rounding and the codec's error), but only
the delegates' bytes cross between clouds: 2 (C - 1) / C vectors per cloud instead of per peer. Only that leg is
compressed: inside a cloud the vectors travel as exact fp32, so every cloud ends with the very values its delegate
got across the WAN. Every member decodes the same payloads,
so the whole group ends with identical values. Any failed phase fails the round for the members it reaches; a
delegate that failed broadcasts the failure, so its cloud does not wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID

from p2pfed.butterfly import Butterfly, ButterflyStats, Routes
from p2pfed.compression import Compressor, Fp32
from p2pfed.robust import Guard

__all__ = ["Member", "delegates", "hierarchical_allreduce"]


@dataclass(frozen=True, slots=True)
class Member:
    peer: PeerID
    cloud: str
    weight: float
    share: float  # of the reduction work; 0 for a member that cannot accept streams (client mode)


def delegates(members: Sequence[Member]) -> dict[str, int]:
    """Cloud label -> index of its delegate: the first member in group order that accepts streams, else the first."""
    out: dict[str, int] = {}
    for i, m in enumerate(members):
        if m.cloud not in out or (members[out[m.cloud]].share <= 0 < m.share):
            out[m.cloud] = i
    return out


async def hierarchical_allreduce(
    butterfly: Butterfly,
    tag: bytes,
    members: Sequence[Member],
    me: int,
    vector: torch.Tensor,
    *,
    codec: Compressor,
    round: int,
    timeout: float,
    routes: Routes | None = None,
    guard: Guard | None = None,
    ring: bool = False,
) -> tuple[torch.Tensor | None, ButterflyStats]:
    """The group's weighted mean of `vector`, reduced cloud by cloud; None (reason in stats) when a phase failed.
    `guard` screens the members' copies in both all-reduces (a cloud's mean of updates within a norm bound is
    within it too). `ring` (averaging.schedule ring): the delegates' leg across clouds goes around a ring
    (p2pfed/ring.py), one flow per cloud's uplink, when every delegate accepts streams and the codec is elementwise;
    each delegate then screens its own cloud's mean, and inside a cloud the butterfly still screens every member."""
    stats = ButterflyStats()
    cloud = members[me].cloud
    local = [i for i, m in enumerate(members) if m.cloud == cloud]
    heads = delegates(members)
    head = heads[cloud]
    peers = [m.peer for m in members]

    # 1. the cloud's mean, over the cloud's own links
    cloud_mean: torch.Tensor | None = vector
    if len(local) > 1:
        cloud_mean, part = await butterfly.allreduce(
            tag + b"/cloud",
            [peers[i] for i in local],
            local.index(me),
            vector,
            weight=members[me].weight,
            shares=_shares([members[i] for i in local]),
            codec=Fp32(),
            round=round,
            timeout=timeout,
            routes=routes,
            guard=guard,
        )
        stats.merge(part)

    # 2. delegates only: the clouds' means across clouds, each weighted by its cloud's samples
    mean = cloud_mean
    if me == head and len(heads) > 1 and cloud_mean is not None:
        order = sorted(heads.values())
        weight = sum(members[i].weight for i in local)
        if ring and codec.elementwise and all(members[i].share > 0 for i in order):
            mean, part = await butterfly.ring_allreduce(
                tag + b"/wan",
                [peers[i] for i in order],
                order.index(me),
                cloud_mean,
                weight=weight,
                codec=codec,
                round=round,
                timeout=timeout,
                routes=routes,
                guard=guard,
            )
        else:
            mean, part = await butterfly.allreduce(
                tag + b"/wan",
                [peers[i] for i in order],
                order.index(me),
                cloud_mean,
                weight=weight,
                shares=_shares([members[i] for i in order]),
                codec=codec,
                round=round,
                timeout=timeout,
                routes=routes,
                guard=guard,
            )
        stats.merge(part)

    # 3. the delegate hands the group's mean to its cloud (or, having failed, the failure)
    if len(local) > 1:
        mean, part = await butterfly.broadcast(
            tag + b"/back",
            [peers[i] for i in local],
            local.index(me),
            local.index(head),
            mean if me == head else None,
            numel=vector.numel(),
            codec=Fp32(),
            round=round,
            timeout=timeout,
            routes=routes,
        )
        stats.merge(part)
    if mean is None:
        stats.reason = stats.reason or "a phase of the hierarchical all-reduce failed"
    return mean, stats


def _shares(members: Sequence[Member]) -> list[float]:
    shares = [m.share for m in members]
    return shares if sum(shares) > 0 else [1.0] * len(members)  # nobody accepts streams: the butterfly says so
