"""Link efficiency of one averaging round on a rate-limited link: bytes sent / (time x link rate). Needs root.

    p2pfed bench link --peers 3 --rate-mbit 100 --numel 5000000 --compression none [--transport tcp] [--json]

Each peer runs in its own network namespace behind a `tc tbf` link of the given rate in each direction (the same
namespaces as `p2pfed bench wan`, removed afterwards whatever happens). The peers then run the p2pfed side of
`p2pfed bench allreduce` there: one warm-up round, then `rounds` timed ones, each checked against the exact mean.

A butterfly round sends, from each peer, its parts to the other reducers and its reduced part back to them, and no
peer can receive faster than the others send, so a round cannot end before every peer's uplink has carried its
bytes: the ideal round time is bytes_sent_per_peer x 8 / rate. `link_efficiency` = that ideal time / the measured
all-reduce time (median over rounds of the slowest peer), i.e. the share of the link's rate the averaging gets;
`step_efficiency` is the same over the whole step (group formation included). `tcp_probe_mbit` is one raw TCP bulk
send across the same link, for scale. `tcp_all_to_all_efficiency` is what raw TCP gets for the same bytes per peer,
every peer sending its share to every other at once (median of 3), and `ratio_to_tcp` is the round's rate over
that: how close the averaging comes to the transport under it.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from p2pfed.bench.allreduce import run_p2pfed_side
from p2pfed.bench.wan import Interrupts, WanNet

__all__ = ["run_link"]

logger = logging.getLogger(__name__)


def run_link(
    *,
    n_peers: int,
    rate_mbit: float,
    numel: int,
    rounds: int,
    compression: str,
    transport: str,
    schedule: str = "butterfly",
) -> dict[str, Any]:
    net = WanNet(n_peers, rate_mbit)

    t0 = time.monotonic()
    with Interrupts() as interrupts:
        try:
            net.build()
            logger.info("namespaces %s-* on %s.0/24, %g mbit each way", net.prefix, net.subnet, rate_mbit)
            probe = net.probe_mbit()
            peers = run_p2pfed_side(
                n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport,
                schedule=schedule, hosts=[net.address(i) for i in range(n_peers)], netns=net.names,
            )  # fmt: skip
            sent = statistics.mean(statistics.mean(p["bytes_sent"]) for p in peers)
            # The reference: raw TCP moving the same bytes per peer, all peers to all at once, over the same links
            tcp_times = [t for t in (net.all_to_all_s(int(sent)) for _ in range(3)) if t is not None]
            tcp_s = statistics.median(tcp_times) if tcp_times else None
        finally:
            interrupts.shield()
            net.destroy()
            left = net.leftovers()
    allreduce_s = statistics.median(max(r) for r in zip(*(p["allreduce_times"] for p in peers), strict=True))
    step_s = statistics.median(max(r) for r in zip(*(p["times"] for p in peers), strict=True))
    ideal_s = sent * 8 / (rate_mbit * 1e6)
    return {
        "link_efficiency": ideal_s / allreduce_s,
        "tcp_all_to_all_efficiency": ideal_s / tcp_s if tcp_s else None,
        "ratio_to_tcp": tcp_s / allreduce_s if tcp_s else None,
        "tcp_all_to_all_s": tcp_s,
        "step_efficiency": ideal_s / step_s,
        "allreduce_s": allreduce_s,
        "step_s": step_s,
        "ideal_s": ideal_s,
        "bytes_sent_per_peer": int(sent),
        "max_abs_error": max(max(p["errors"]) for p in peers),
        "tcp_probe_mbit": probe,
        "n_peers": n_peers,
        "rate_mbit": rate_mbit,
        "numel": numel,
        "rounds": rounds,
        "compression": compression,
        "transport": transport,
        "schedule": schedule,
        "wall_s": round(time.monotonic() - t0, 1),
        "leftovers": left,
    }
