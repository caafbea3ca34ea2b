"""Integration: `p2pfed swarm` stops on Ctrl+C with every peer's report written and no process behind. (A swarm run
to --max-steps, with profiles in turn and the combined report, is tests/test_batching.py's swarm test.)"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow


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
