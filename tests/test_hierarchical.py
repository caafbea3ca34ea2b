"""Hierarchical mode: peers average inside their cloud, one delegate per cloud averages across clouds, and the
result flows back. Three real peers in two clouds (aws, gcp, aws): the loss falls, the parameters agree, and only
one aws peer ever sends bytes to gcp. The peers share a global batch in time shares (training.share_by time): each
computes for the swarm's time for the batch, so the steps' batches are about the global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 30
GLOBAL = 24


def test_hierarchical_swarm_trains_agrees_and_crosses_clouds_once_per_cloud(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: profiles in two clouds, given to the peers in turn (aws, gcp, aws).
    for cloud in ("aws", "gcp"):
        (tmp_path / f"{cloud}.yaml").write_text(f"name: {cloud}-cpu\ndevice: cpu\nthreads: 1\ncloud: {cloud}\n")

    # Execute
    swarm = launcher.start(
        "swarm", "--peers", "3", "--config", TINY, "--max-steps", str(STEPS),
        "--set", "averaging.mode=hierarchical", "--set", "compression.name=fp16",
        "--set", f"training.global_batch_size={GLOBAL}", "--set", "training.share_by=time",
        "--profile", str(tmp_path / "aws.yaml"), "--profile", str(tmp_path / "gcp.yaml"),
        "--run-dir", str(tmp_path / "run"), "--report", str(tmp_path / "report.json"), name="swarm",
    )  # fmt: skip
    assert swarm.wait(timeout=300) == 0, swarm.stdout()[-3000:] + swarm.stderr()[-3000:]

    # Assert: trained together to a lower eval loss, and ended in agreement.
    report = json.loads((tmp_path / "report.json").read_text())
    peers = report["peers"]
    assert len(peers) == 3
    for peer in peers:
        assert peer["final_step"] == STEPS and peer["rounds_ok"] >= STEPS // 2
        assert peer["eval_loss"] < peer["initial_eval_loss"] - 1.0
    assert report["max_param_divergence"] < 1e-4

    # Assert: every peer did its part of about one global batch a step (as many samples as fit in its time: a
    # shared two-core machine makes that wander, but not by half)
    per_step = sum(p["samples"] for p in peers) / STEPS
    assert all(p["samples"] >= STEPS for p in peers)
    assert 0.5 * GLOBAL <= per_step <= 1.5 * GLOBAL, per_step

    # Assert: per round, one aws delegate and the gcp peer all-reduce the fp16 vector: each sends half of it and
    # replies with its reduced half, n fp16 elements = 2n bytes. (A flat butterfly of the three would send 8n/3
    # from aws to gcp: both aws peers send a third and reply with a third.) Which aws peer is the delegate may
    # change from round to round with the group's order.
    aws = [p["bytes_by_cloud"] for p in peers if p["cloud"] == "aws"]
    (gcp,) = [p for p in peers if p["cloud"] == "gcp"]
    assert len(aws) == 2 and set(gcp["bytes_by_cloud"]) == {"aws"}
    per_round = 2 * peers[0]["parameters"]
    aws_to_gcp = sum(b.get("gcp", 0) for b in aws)
    assert gcp["rounds_ok"] * per_round <= aws_to_gcp
    assert aws_to_gcp <= (gcp["rounds_ok"] + gcp["rounds_failed"]) * per_round * 1.01
    assert wait_no_leftovers(launcher) == []
