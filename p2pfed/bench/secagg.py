"""What secure aggregation costs: the same averaging round with and without masks, in one run.

    p2pfed bench secagg --peers 3 --numel 25000000 --compression uint8 [--transport tcp] [--rate-mbit 100] [--json]

Runs the p2pfed side of `p2pfed bench allreduce` twice on the same peers' tensors: plain (the compressor's own
round), then masked (privacy.secure_aggregation: fixed point in Z_2^b, pairwise ChaCha20 masks, b bits per element
on the wire). With `--rate-mbit` both run inside network namespaces behind `tc tbf` links of that rate (root only,
as `p2pfed bench link`). Ratios are masked / plain: all-reduce time, whole step time, bytes sent per peer.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from p2pfed.bench.allreduce import Result, median_of_slowest, run_p2pfed_side
from p2pfed.bench.wan import Interrupts, WanNet

__all__ = ["run_secagg"]


def run_secagg(
    *, n_peers: int, numel: int, rounds: int, compression: str, transport: str, rate_mbit: float | None
) -> dict[str, Any]:
    t0 = time.monotonic()
    sides: dict[str, list[Result]] = {}
    if rate_mbit is None:
        for name, secure in (("plain", False), ("masked", True)):
            sides[name] = run_p2pfed_side(
                n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport,
                secure=secure,
            )  # fmt: skip
        leftovers: list[str] = []
    else:
        net = WanNet(n_peers, rate_mbit)
        with Interrupts() as interrupts:
            try:
                net.build()
                for name, secure in (("plain", False), ("masked", True)):
                    sides[name] = run_p2pfed_side(
                        n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport,
                        hosts=[net.address(i) for i in range(n_peers)], netns=net.names, secure=secure,
                    )  # fmt: skip
            finally:
                interrupts.shield()
                net.destroy()
                leftovers = net.leftovers()
    out: dict[str, Any] = {}
    for name, peers in sides.items():
        out[f"{name}_allreduce_s"] = median_of_slowest([p["allreduce_times"] for p in peers])
        out[f"{name}_step_s"] = median_of_slowest([p["times"] for p in peers])
        out[f"{name}_bytes_sent_per_peer"] = int(statistics.mean(statistics.mean(p["bytes_sent"]) for p in peers))
        out[f"{name}_max_abs_error"] = max(max(p["errors"]) for p in peers)
    out["time_ratio"] = out["masked_allreduce_s"] / out["plain_allreduce_s"]
    out["step_ratio"] = out["masked_step_s"] / out["plain_step_s"]
    out["bytes_ratio"] = out["masked_bytes_sent_per_peer"] / out["plain_bytes_sent_per_peer"]
    out.update(
        n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport,
        rate_mbit=rate_mbit, wall_s=round(time.monotonic() - t0, 1), leftovers=leftovers,
    )  # fmt: skip
    return out
