"""Egress cost per cloud pair (p2pfed/cost.py): prices looked up by cloud label, the sync fp32 baseline's bytes
against a direct count of what a bandwidth-optimal all-reduce sends.

.venv/bin/python -m pytest -q tests/test_cost.py
"""

from __future__ import annotations

import itertools

import pytest

from p2pfed.config import CostConfig, load_config
from p2pfed.cost import bytes_by_pair, egress_usd, price_per_gb, sync_fp32_bytes_by_pair
from p2pfed.errors import ConfigError


def test_prices_follow_the_senders_cloud_label_then_its_provider_prefix_then_the_default() -> None:
    cost = CostConfig(
        egress_usd_per_gb={"aws": 0.09, "gcp-eu": 0.085}, default_usd_per_gb=0.1, intra_cloud_usd_per_gb=0.02
    )

    assert price_per_gb("aws-us-east-1", "gcp", cost) == 0.09
    assert price_per_gb("gcp-eu", "aws", cost) == 0.085
    assert price_per_gb("onprem", "aws", cost) == 0.1
    assert price_per_gb("aws", "aws", cost) == 0.02


def test_sync_baseline_counts_what_a_butterfly_all_reduce_sends_each_step() -> None:
    # Prepare: three peers in two clouds; the reference splits each vector into n slices by hand
    reports = [
        {"cloud": "aws", "parameters": 3000, "steps": 10},
        {"cloud": "gcp", "parameters": 3000, "steps": 10},
        {"cloud": "aws", "parameters": 3000, "steps": 4},  # joined late
    ]
    expected: dict[tuple[str, str], int] = {}
    for s, r in itertools.permutations(range(3), 2):
        slice_bytes = 4 * 3000 // 3  # s sends r its slice of s's vector, and r's reduced slice back: both n/3 floats
        pair = (reports[s]["cloud"], reports[r]["cloud"])
        expected[pair] = expected.get(pair, 0) + 2 * slice_bytes * reports[s]["steps"]

    # Execute
    base = sync_fp32_bytes_by_pair(reports)

    # Assert
    assert base == expected
    assert sync_fp32_bytes_by_pair(reports[:1]) == {}


def test_bytes_by_pair_sums_reports_and_costs_scale_with_gigabytes() -> None:
    reports = [
        {"cloud": "aws", "bytes_by_cloud": {"gcp": 2_000_000_000, "aws": 10}},
        {"cloud": "aws", "bytes_by_cloud": {"gcp": 1_000_000_000}},
        {"cloud": "gcp", "bytes_by_cloud": {"aws": 500_000_000}},
    ]

    pairs = bytes_by_pair(reports)
    usd = egress_usd(pairs, CostConfig())

    assert pairs == {("aws", "aws"): 10, ("aws", "gcp"): 3_000_000_000, ("gcp", "aws"): 500_000_000}
    assert usd[("aws", "gcp")] == pytest.approx(3 * CostConfig().egress_usd_per_gb["aws"])
    assert usd[("gcp", "aws")] == pytest.approx(0.5 * CostConfig().egress_usd_per_gb["gcp"])


def test_a_negative_price_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cost.egress_usd_per_gb"):
        load_config(None, ["cost.egress_usd_per_gb={aws: -1}"])
