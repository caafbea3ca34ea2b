"""A peer that sends NaN, inf and 1e30 updates (the hidden --fault-update test aid) among honest peers: the reducers
drop its copies before any sum, so every peer's parameters stay finite, the loss still falls, and the swarm agrees.

.venv/bin/python -m pytest -q tests/test_fault_peer.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 40


def test_honest_peers_stay_finite_and_keep_learning_beside_a_peer_that_sends_garbage(
    launcher: Launcher, tmp_path: Path
) -> None:
    # Prepare: three peers in sync mode; the third corrupts every update it sends (NaN, inf, 1e30 in turn).
    def args(i: int, extra: list[str]) -> list[str]:
        return [
            "peer", "--config", TINY, "--profile", CPU_PROFILE, "--max-steps", str(STEPS), "--events", "jsonl",
            "--set", "swarm.min_peers=3", "--set", "data.num_partitions=3", "--set", f"data.partition_index={i}",
            "--report", str(tmp_path / f"peer{i}.json"), "--save-params", str(tmp_path / f"peer{i}.safetensors"),
            *extra,
        ]  # fmt: skip

    first = launcher.start(*args(0, []), name="peer0")
    bootstrap = first.bootstrap()
    second = launcher.start(*args(1, ["--initial-peers", bootstrap]), name="peer1")
    faulty = launcher.start(*args(2, ["--initial-peers", bootstrap, "--fault-update", "mixed"]), name="peer2")

    # Execute
    codes = [p.wait(timeout=240) for p in (first, second, faulty)]

    # Assert: everyone finished, every parameter of every peer is finite, the honest peers learned, the reducers
    # dropped the faulty copies, and the peers agree.
    assert codes == [0, 0, 0], [p.stderr()[-2000:] for p in (first, second, faulty)]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(3)]
    params = [load_file(tmp_path / f"peer{i}.safetensors") for i in range(3)]
    assert "fault injection" in faulty.stderr()
    for report, tensors in zip(reports, params, strict=True):
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
        assert math.isfinite(report["param_l2"]) and math.isfinite(report["eval_loss"])
    for report in reports[:2]:
        assert report["eval_loss"] < report["initial_eval_loss"] - 1.0, report
        assert report["rounds_ok"] >= STEPS // 2
    assert sum(r["contributions_dropped"] for r in reports) >= STEPS  # the faulty peer's copy, every round
    assert "dropped a contribution" in first.stderr() + second.stderr()
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(3)])
    assert divergence is not None and divergence < 1e-4
    assert wait_no_leftovers(launcher) == []
