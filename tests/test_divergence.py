"""Fault injection, two faults in one swarm of three:
- a peer whose parameters silently diverge (as after an update only it applied) is caught by the group's parameter
  fingerprints at its next round, downloads the majority's state, and the swarm ends in agreement;
- a peer that sends NaN, inf and 1e30 updates (the hidden --fault-update test aid) has its copies dropped by the
  reducers before any sum (p2pfed/robust.py), so every peer stays finite and the loss still falls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from p2pfed.actors.averager import TIE_ROUNDS, _diverged_members
from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, wait_no_leftovers

STEPS = 30
PERTURB_AT = 10


def _peer_args(tmp_path: Path, i: int, *, peers: int, steps: int, extra: list[str]) -> list[str]:
    """`p2pfed peer` for peer i of a swarm of `peers` on their own shards, with its report and parameters saved."""
    return [
        "peer", "--config", TINY, "--profile", CPU_PROFILE, "--max-steps", str(steps), "--events", "jsonl",
        "--set", f"swarm.min_peers={peers}", "--set", f"data.num_partitions={peers}",
        "--set", f"data.partition_index={i}", "--report", str(tmp_path / f"peer{i}.json"),
        "--save-params", str(tmp_path / f"peer{i}.safetensors"), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("prints", "expected"),
    [
        ({"a": 1.0, "b": 1.0 + 1e-9, "c": 1.0}, set()),  # rounding noise only
        ({"a": 1.0, "b": 1.01, "c": 1.0}, {"b"}),  # one outlier against a majority
        ({"a": 1.01, "b": 1.0}, {"b"}),  # no majority: the smallest peer id's value wins
        ({"a": 2.0, "b": 1.0, "c": 1.0, "d": 3.0}, {"a", "d"}),
    ],
)
def test_diverged_members(prints: dict[str, float], expected: set[str]) -> None:
    gathered = {peer: {"step": 5, "fingerprint": fp} for peer, fp in prints.items()}
    assert _diverged_members(gathered) == expected


@pytest.mark.parametrize(
    ("prints", "expected"),
    [
        ({"a": 1.01, "b": 1.0}, None),  # two members that disagree: nobody can tell who is right
        ({"a": 1.0, "b": 1.01, "c": 1.0, "d": 1.01}, None),  # the two largest clusters tie
        ({"a": 1.01, "b": 1.0, "c": 1.0}, {"a"}),  # a majority decides without a tie-break
        ({"a": 1.0, "b": 1.0}, set()),
    ],
)
def test_diverged_members_without_tie_break(prints: dict[str, float], expected: set[str] | None) -> None:
    gathered = {peer: {"step": 5, "fingerprint": fp} for peer, fp in prints.items()}
    assert _diverged_members(gathered, tie_break=False) == expected


@pytest.mark.slow
def test_a_diverged_peer_recovers_and_a_garbage_sending_peer_is_ignored(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: three peers; the second sends garbage updates every round, the third corrupts its own parameters
    # after step PERTURB_AT.
    def args(i: int, extra: list[str]) -> list[str]:
        return _peer_args(tmp_path, i, peers=3, steps=STEPS, extra=extra)

    first = launcher.start(*args(0, []), name="peer0")
    bootstrap = first.bootstrap()
    second = launcher.start(*args(1, ["--initial-peers", bootstrap, "--fault-update", "mixed"]), name="peer1")
    faulty = launcher.start(*args(2, ["--initial-peers", bootstrap, "--perturb-at", str(PERTURB_AT)]), name="peer2")

    # Execute
    codes = [p.wait(timeout=240) for p in (first, second, faulty)]

    # Assert: the faulty peer was detected, took the others' state, and everyone ends with the same parameters.
    assert codes == [0, 0, 0], [p.stderr()[-2000:] for p in (first, second, faulty)]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(3)]
    assert "fault injection: parameters perturbed" in faulty.stderr()
    assert any("diverged" in reason for reason in reports[2]["failure_reasons"])
    assert reports[2]["diverged"] >= 1 and reports[2]["state_downloads"] >= 1
    # the honest peers were never found out of line (a peer that fell behind still catches up by a state download)
    assert reports[0]["diverged"] == 0 and reports[1]["diverged"] == 0
    assert all(r["final_step"] == STEPS for r in reports)
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(3)])
    assert divergence is not None and divergence < 1e-4

    # Assert: the garbage never reached a model: every parameter finite, the loss fell, the copies were dropped
    for i, report in enumerate(reports):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(tmp_path / f"peer{i}.safetensors").values())
        assert math.isfinite(report["eval_loss"]) and report["eval_loss"] < report["initial_eval_loss"] - 1.0
    assert "fault injection: this round's update carries" in second.stderr()
    assert sum(r["contributions_dropped"] for r in reports) >= STEPS // 2
    assert "dropped a contribution" in first.stderr() + faulty.stderr()
    assert wait_no_leftovers(launcher) == []


@pytest.mark.slow
def test_two_peers_that_disagree_wait_for_a_majority_then_break_the_tie(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: a swarm of two; the second corrupts its own parameters after step PERTURB_AT, so every later round
    # has two members that disagree and no majority.
    steps = PERTURB_AT + 10

    def args(i: int, extra: list[str]) -> list[str]:
        return _peer_args(tmp_path, i, peers=2, steps=steps, extra=extra)

    first = launcher.start(*args(0, []), name="peer0")
    second = launcher.start(*args(1, ["--initial-peers", first.bootstrap(), "--perturb-at", str(PERTURB_AT)]))

    # Execute
    codes = [p.wait(timeout=240) for p in (first, second)]

    # Assert: TIE_ROUNDS - 1 tied rounds fail on both without a download, then exactly one peer takes the other's
    # state, and the two end in agreement.
    assert codes == [0, 0], [p.stderr()[-2000:] for p in (first, second)]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(2)]
    for report in reports:
        assert report["failure_reasons"].get("parameters of the members disagree, with no majority to tell who is "
                                             "right", 0) >= TIE_ROUNDS - 1  # fmt: skip
    assert sorted(min(1, r["diverged"]) for r in reports) == [0, 1]
    assert all(r["final_step"] == steps for r in reports)
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(2)])
    assert divergence is not None and divergence < 1e-4
    assert wait_no_leftovers(launcher) == []
