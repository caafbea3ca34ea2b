"""Integration: a peer that joins a running swarm downloads its state and ends in agreement; `p2pfed status`
lists the live peers of the run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, PeerProcess, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 80
# The first two peers emulate much slower hardware (profile slowdown 10: they sleep nine times their compute time),
# so their run lasts long enough, and leaves the cores free enough, for the third to start up and join in its middle.
SLOWDOWN = 10


def _args(tmp: Path, i: int, extra: list[str]) -> list[str]:
    profile = tmp / "slow.yaml" if i < 2 else CPU_PROFILE
    return [
        "peer", "--config", TINY, "--profile", str(profile), "--max-steps", str(STEPS), "--events", "jsonl",
        "--set", "swarm.min_peers=2", "--set", "averaging.target_group_size=3",
        "--set", "data.num_partitions=3",
        "--set", f"data.partition_index={i}",
        "--report", str(tmp / f"peer{i}.json"), "--save-params", str(tmp / f"peer{i}.safetensors"), *extra,
    ]  # fmt: skip


def _peer_id(proc: PeerProcess) -> str:
    return json.loads(proc.wait_for('"kind": "bootstrap"', 5))["peer_id"]


def test_late_joiner_downloads_state_and_status_lists_peers(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: two slow peers start training.
    (tmp_path / "slow.yaml").write_text(Path(CPU_PROFILE).read_text().replace("slowdown: 1.0", f"slowdown: {SLOWDOWN}"))
    first = launcher.start(*_args(tmp_path, 0, []), name="peer0")
    bootstrap = first.bootstrap()
    second = launcher.start(*_args(tmp_path, 1, ["--initial-peers", bootstrap]), name="peer1")
    deadline = time.monotonic() + 120
    while first.progress_step() < 3:
        assert time.monotonic() < deadline, first.stderr()[-2000:]
        assert first.proc.poll() is None, first.stderr()[-2000:]
        time.sleep(0.2)

    # Execute: status sees the run while it trains; a third peer joins mid-run (started together: a run of STEPS
    # steps lasts about half a minute here, not much longer than two processes' start-up).
    status = launcher.start("status", "--initial-peers", bootstrap, "--json", name="status")
    second_maddr = second.bootstrap()  # any live peer can be a bootstrap; give the joiner both
    late = launcher.start(
        *_args(tmp_path, 2, ["--initial-peers", bootstrap, "--initial-peers", second_maddr]), name="peer2"
    )
    assert status.wait(timeout=60) == 0, status.stderr()
    runs = json.loads(status.stdout())
    codes = [p.wait(timeout=240) for p in (first, second, late)]

    # Assert: status listed the two training peers of run "tiny" with their progress.
    run = next(r for r in runs if r["run_id"] == "tiny")
    training = {p["peer_id"]: p for p in run["peers"] if p["step"] >= 1}
    assert set(training) >= {_peer_id(first), _peer_id(second)}
    assert all(p["samples_per_s"] > 0 and p["cloud"] == "local" and p["loss"] > 0 for p in training.values())

    # Assert: the late peer downloaded state, trained only the remaining steps, and agrees with the swarm.
    assert codes == [0, 0, 0], [p.stderr()[-2000:] for p in (first, second, late)]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(3)]
    assert all(r["final_step"] == STEPS for r in reports)
    assert reports[2]["state_downloads"] >= 1
    assert 3 <= reports[2]["start_step"] < STEPS
    assert reports[2]["steps"] == STEPS - reports[2]["start_step"]
    assert reports[2]["rounds_ok"] >= 1
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(3)])
    assert divergence is not None and divergence < 1e-4
    assert wait_no_leftovers(launcher) == []
