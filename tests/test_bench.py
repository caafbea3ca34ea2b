"""`p2pfed bench allreduce` runs both sides in one run, checks p2pfed's result against the exact mean, and reports
a ratio that is its two timings divided."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow


def test_bench_allreduce_json(launcher: Launcher, tmp_path: Path) -> None:
    bench = launcher.start(
        "bench", "allreduce", "--peers", "2", "--numel", "100000", "--rounds", "2", "--json", name="bench"
    )
    assert bench.wait(timeout=240) == 0, bench.stderr()[-3000:]

    result = json.loads(bench.stdout().strip().splitlines()[-1])
    assert {"p2pfed_s", "gloo_s", "ratio"} <= set(result)
    assert result["p2pfed_s"] > 0 and result["gloo_s"] > 0
    assert result["ratio"] == pytest.approx(result["p2pfed_s"] / result["gloo_s"], rel=1e-6)
    assert result["max_abs_error"] < 1e-5  # fp32 all-reduce of N(0,1) data: the exact mean up to rounding
    # butterfly all-reduce of 2 peers: each sends half its vector and returns half of its averaged slice
    assert result["bytes_sent_per_peer"] >= 4 * 100_000 * (2 - 1) / 2 * 2
    assert wait_no_leftovers(launcher) == []
