"""DiLoCo mode: peers take inner_steps local AdamW steps, average the pseudo-gradient once per round, and take an
outer Nesterov step from the shared point. Three real peers: the loss falls, the shared parameters agree, and the
bytes sent are one all-reduce per round (1/inner_steps of synchronous averaging per step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow

INNER, STEPS, PEERS = 10, 60, 3


def test_diloco_swarm_trains_and_agrees(launcher: Launcher, tmp_path: Path) -> None:
    # Execute: blocking outer rounds over libp2p (tests/test_secure_swarm.py runs overlapped rounds over TCP)
    swarm = launcher.start(
        "swarm", "--peers", str(PEERS), "--config", TINY, "--max-steps", str(STEPS),
        "--set", "averaging.mode=diloco", "--set", f"averaging.inner_steps={INNER}",
        "--set", "averaging.overlap=false", "--set", "averaging.transport=libp2p",
        "--run-dir", str(tmp_path / "run"), "--report", str(tmp_path / "report.json"), name="swarm",
    )  # fmt: skip
    assert swarm.wait(timeout=300) == 0, swarm.stdout()[-3000:]

    # Assert: every peer reached the last step through outer rounds, and the loss fell.
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["peers"]) == PEERS
    for peer in report["peers"]:
        assert peer["final_step"] == STEPS
        assert peer["rounds_ok"] + peer["rounds_solo"] + peer["state_downloads"] >= 1
        assert peer["eval_loss"] < peer["initial_eval_loss"] - 1.0
        assert peer["rounds_ok"] <= STEPS // INNER
    assert report["max_param_divergence"] < 1e-4

    # Assert: one fp32 all-reduce per round. In a butterfly all-reduce of n peers the swarm sends, in all, each
    # peer's vector minus its own slice and each reducer's result minus its own copy: 2 (n-1) vectors per round.
    peers = report["peers"]
    vector_bytes = 4 * peers[0]["parameters"]
    per_round = 2 * (PEERS - 1) * vector_bytes
    least = min(p["rounds_ok"] for p in peers)  # rounds every peer committed
    most = max(p["rounds_ok"] + p["rounds_failed"] for p in peers)  # a failed round may have sent part of its bytes
    total = sum(p["bytes_sent"] for p in peers)
    assert least * per_round <= total <= 1.02 * most * per_round
    assert wait_no_leftovers(launcher) == []
