"""Integration: `p2pfed swarm` runs local peers to completion or until Ctrl+C, writes the combined report, and
leaves no process behind."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from p2pfed.report import PEER_KEYS
from tests.conftest import TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow


def test_swarm_runs_to_max_steps(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: two profiles that differ in their cloud label, given to the peers in turn (aws, gcp, aws).
    for cloud in ("aws", "gcp"):
        (tmp_path / f"{cloud}.yaml").write_text(f"name: {cloud}-cpu\ndevice: cpu\nthreads: 1\ncloud: {cloud}\n")

    # Execute
    swarm = launcher.start(
        "swarm", "--peers", "3", "--config", TINY, "--max-steps", "15", "--run-dir", str(tmp_path / "run"),
        "--profile", str(tmp_path / "aws.yaml"), "--profile", str(tmp_path / "gcp.yaml"),
        "--report", str(tmp_path / "report.json"), name="swarm",
    )  # fmt: skip
    while swarm.proc.poll() is None and len(launcher.groups) < 4:
        launcher.track_groups()
        time.sleep(0.2)
    code = swarm.wait(timeout=240)

    # Assert: a complete combined report of peers that agree.
    assert code == 0, swarm.stdout()[-3000:] + swarm.stderr()[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"run_id", "peers", "max_param_divergence"}
    assert report["run_id"] == "tiny" and len(report["peers"]) == 3
    for peer in report["peers"]:
        assert set(PEER_KEYS) <= set(peer)
        assert peer["final_step"] == 15 and peer["rounds_ok"] >= 1
    assert 0 <= report["max_param_divergence"] < 1e-4
    assert "summary" in swarm.stdout()

    # Assert: bytes are booked to the cloud of the peer they went to, and add up to what the round counted.
    by_cloud = {p["cloud"]: [] for p in report["peers"]}
    for peer in report["peers"]:
        by_cloud[peer["cloud"]].append(peer["bytes_by_cloud"])
    assert sorted(by_cloud) == ["aws", "gcp"] and len(by_cloud["aws"]) == 2
    assert all(set(b) == {"aws", "gcp"} for b in by_cloud["aws"])  # an aws peer sends to the other aws peer too
    assert all(set(b) == {"aws"} for b in by_cloud["gcp"])  # the only gcp peer sends only to aws
    for peer in report["peers"]:
        assert 0 < sum(peer["bytes_by_cloud"].values()) <= peer["bytes_sent"]
    assert wait_no_leftovers(launcher) == []


def test_swarm_stops_cleanly_on_ctrl_c(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: a swarm that would run for a long time.
    run_dir = tmp_path / "run"
    swarm = launcher.start(
        "swarm", "--peers", "2", "--config", TINY, "--max-steps", "100000", "--run-dir", str(run_dir), name="swarm"
    )
    deadline = time.monotonic() + 120
    while not all(_logged_step(run_dir / f"peer-{i}.log") >= 5 for i in range(2)):
        assert time.monotonic() < deadline and swarm.proc.poll() is None, swarm.stdout()[-3000:]
        time.sleep(0.3)
    launcher.track_groups()  # the peers' own process groups: they must all be gone at the end
    assert len(launcher.groups) >= 3

    # Execute: Ctrl+C reaches the launcher only (peers live in their own sessions).
    swarm.proc.send_signal(signal.SIGINT)
    code = swarm.wait(timeout=60)

    # Assert: stopped, every peer still wrote its report, nothing left running.
    assert code == 130, swarm.stdout()[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["peers"]) == 2 and all(p["steps"] >= 5 for p in report["peers"])
    assert report["max_param_divergence"] is not None
    assert wait_no_leftovers(launcher) == []


def _logged_step(log: Path) -> int:
    step = 0
    if log.exists():
        for line in log.read_text().splitlines():
            if line.startswith('{"kind": "progress"'):
                step = json.loads(line)["step"]
    return step
