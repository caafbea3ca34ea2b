"""A peer stops cleanly on SIGTERM (report written, exit 0), and SIGKILL of its main process leaves no orphan."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, PeerProcess, wait_no_leftovers

pytestmark = pytest.mark.slow

FREEZES = 8


def _start_and_wait_for_steps(launcher: Launcher, tmp_path: Path, name: str, steps: int) -> PeerProcess:
    peer = launcher.start(
        "peer", "--config", TINY, "--profile", CPU_PROFILE, "--events", "jsonl", "--max-steps", "1000000",
        "--report", str(tmp_path / f"{name}.json"), name=name,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while peer.progress_step() < steps:
        assert time.monotonic() < deadline and peer.proc.poll() is None, peer.stderr()[-2000:]
        time.sleep(0.2)
    return peer


def test_sigterm_stops_the_peer_cleanly(launcher: Launcher, tmp_path: Path) -> None:
    peer = _start_and_wait_for_steps(launcher, tmp_path, "term", 5)

    os.kill(peer.proc.pid, signal.SIGTERM)  # the main process only: it must take its children down itself
    code = peer.wait(timeout=60)

    assert code == 0, peer.stderr()[-2000:]
    assert "SIGTERM received" in peer.stderr()
    report = json.loads((tmp_path / "term.json").read_text())
    assert report["steps"] >= 5
    assert wait_no_leftovers(launcher) == []


def test_sigkill_of_the_main_process_alone_leaves_no_orphan(launcher: Launcher, tmp_path: Path) -> None:
    peer = _start_and_wait_for_steps(launcher, tmp_path, "killed", 3)
    assert len(launcher.leftovers()) >= 4  # main, DHT and averager processes and p2pd are running

    os.kill(peer.proc.pid, signal.SIGKILL)  # only the main process: nothing can stop its children in order

    assert peer.wait(timeout=30) == -signal.SIGKILL
    assert wait_no_leftovers(launcher, timeout=5) == []  # their lifelines take them down at once (p2pfed/lifeline.py)


def test_identity_file_keeps_the_peer_id_across_restarts(launcher: Launcher, tmp_path: Path) -> None:
    identity = tmp_path / "peer.key"
    ids = []
    for run in range(2):
        peer = launcher.start(
            "peer", "--config", TINY, "--events", "jsonl", "--identity", str(identity), "--max-steps", "1",
            name=f"identity{run}",
        )  # fmt: skip
        ids.append(json.loads(peer.wait_for('"kind": "bootstrap"', 90))["peer_id"])
        assert peer.wait(timeout=60) == 0, peer.stderr()[-2000:]

    assert identity.is_file()
    assert ids[0] == ids[1]
    assert wait_no_leftovers(launcher) == []


def test_a_partner_frozen_for_seconds_costs_rounds_never_agreement(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: two peers of one swarm (a partner that stalls, as on an overloaded machine or in a long GC pause)
    def start(name: str, index: int, extra: list[str]) -> PeerProcess:
        return launcher.start(
            "peer", "--config", TINY, "--profile", CPU_PROFILE, "--events", "jsonl", "--max-steps", "100",
            "--set", "swarm.min_peers=2", "--set", "data.num_partitions=2", "--set", f"data.partition_index={index}",
            "--report", str(tmp_path / f"{name}.json"), "--save-params", str(tmp_path / f"{name}.safetensors"),
            *extra, name=name,
        )  # fmt: skip

    first = start("first", 0, [])
    second = start("second", 1, ["--initial-peers", first.bootstrap()])
    deadline = time.monotonic() + 120
    while second.progress_step() < 15:
        assert time.monotonic() < deadline and second.proc.poll() is None, second.stderr()[-2000:]
        time.sleep(0.05)

    # Execute: freeze the second peer whole (main, DHT, averager, p2pd) again and again, each time for longer than
    # the first one waits for the next bytes of a part, so that some freezes fall in the middle of an all-reduce
    for _ in range(FREEZES):
        os.killpg(second.pgid, signal.SIGSTOP)
        time.sleep(1.6)
        os.killpg(second.pgid, signal.SIGCONT)
        time.sleep(0.25)
    codes = [first.wait(timeout=120), second.wait(timeout=120)]

    # Assert: the first peer waited for its partner instead of stepping alone, and both end with the same parameters
    assert codes == [0, 0], [p.stderr()[-2000:] for p in (first, second)]
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "second")]
    assert [r["rounds_solo"] for r in reports] == [0, 0], reports
    assert all(r["final_step"] == 100 for r in reports)
    assert max_param_divergence([tmp_path / f"{n}.safetensors" for n in ("first", "second")]) < 1e-4
    assert wait_no_leftovers(launcher) == []
