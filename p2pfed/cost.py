"""Egress cost of a run, per cloud pair, and what plain synchronous fp32 averaging would have cost instead.

    pairs = bytes_by_pair(reports)                  # {(from_cloud, to_cloud): bytes}, from the peer reports
    cost = egress_usd(pairs, cfg.cost)              # {(from_cloud, to_cloud): dollars}
    base = sync_fp32_bytes_by_pair(reports)         # the same peers and steps, fp32 gradients every step

Clouds bill the sender for bytes that leave them: bytes from cloud A to cloud B cost A's internet egress price
(`cost.egress_usd_per_gb`, looked up by the cloud label, then by its part before the first '-', so 'aws-us-east-1'
finds 'aws'); bytes between peers with the same label cost `cost.intra_cloud_usd_per_gb`. One GB is 10^9 bytes.

The baseline is a bandwidth-optimal all-reduce (ring or butterfly) of every peer's fp32 gradient after every step:
in a group of n, each peer sends every other member 1/n of its vector and gets back that member's reduced slice, so
per step it sends 2 * 4P / n bytes to each other member (P parameters). A peer is counted for the steps it reports.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from p2pfed.config import CostConfig

__all__ = ["bytes_by_pair", "egress_usd", "price_per_gb", "sync_fp32_bytes_by_pair"]

Pair = tuple[str, str]


def price_per_gb(source_cloud: str, dest_cloud: str, cost: CostConfig) -> float:
    """Dollars per GB for bytes sent from a peer labelled `source_cloud` to one labelled `dest_cloud`."""
    if source_cloud == dest_cloud:
        return cost.intra_cloud_usd_per_gb
    table = cost.egress_usd_per_gb
    for key in (source_cloud, source_cloud.split("-", 1)[0]):
        if key in table:
            return table[key]
    return cost.default_usd_per_gb


def bytes_by_pair(reports: Sequence[Mapping[str, Any]]) -> dict[Pair, int]:
    """Bytes sent per (sender's cloud, receiver's cloud), summed over the peer reports' `bytes_by_cloud`."""
    out: dict[Pair, int] = defaultdict(int)
    for r in reports:
        for dest, n in (r.get("bytes_by_cloud") or {}).items():
            out[(str(r.get("cloud", "unknown")), str(dest))] += int(n)
    return dict(sorted(out.items()))


def sync_fp32_bytes_by_pair(reports: Sequence[Mapping[str, Any]]) -> dict[Pair, int]:
    """Bytes per cloud pair that synchronous fp32 gradient all-reduce after each step would send for these peers."""
    n = len(reports)
    out: dict[Pair, int] = defaultdict(int)
    if n < 2:
        return {}
    for sender in reports:
        per_member = 2 * 4 * int(sender.get("parameters", 0)) // n * int(sender.get("steps", 0))
        for receiver in reports:
            if receiver is not sender:
                out[(str(sender.get("cloud", "unknown")), str(receiver.get("cloud", "unknown")))] += per_member
    return dict(sorted(out.items()))


def egress_usd(pairs: Mapping[Pair, int], cost: CostConfig) -> dict[Pair, float]:
    return {pair: n / 1e9 * price_per_gb(pair[0], pair[1], cost) for pair, n in pairs.items()}
