"""DiLoCo mode: peers take inner_steps local AdamW steps, average the pseudo-gradient once per round, and take an
outer Nesterov step from the shared point. Three real peers: the loss falls, the shared parameters agree, and the
bytes sent are one all-reduce per round (1/inner_steps of synchronous averaging per step). A member that vanishes in
the middle of a masked round: the others re-form that round at once and lose no inner steps, and the rule that allows
it only to members that hold no piece of the failed result."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from p2pfed.actors.messages import RoundResult
from p2pfed.config import load_config
from p2pfed.phases import may_reform, may_retry
from p2pfed.report import max_param_divergence
from tests.conftest import TINY, Launcher, PeerProcess, group_members, slow_profile, wait_no_leftovers

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
    # a failed round, or the first try of a retried one, may have sent part of its bytes
    most = max(p["rounds_ok"] + p["rounds_failed"] + p["rounds_retried"] for p in peers)
    total = sum(p["bytes_sent"] for p in peers)
    assert least * per_round <= total <= 1.02 * most * per_round
    assert wait_no_leftovers(launcher) == []


def test_a_round_is_re_formed_when_members_vanished_and_masked_only_where_held_pieces_are_known() -> None:
    plain, masked = load_config(TINY), load_config(TINY, ["privacy.secure_aggregation=true"])
    failed = RoundResult(
        committed=False, group_size=3, reason="incomplete all-reduce: member x is gone", max_group_step=10,
        min_group_step=10, unreachable=("x",),
    )  # fmt: skip
    held = RoundResult(**{**failed.__dict__, "held": True})
    assert may_reform(plain, failed, 10) and may_reform(plain, held, 10)
    assert may_reform(masked, failed, 10)
    # a piece of the result with the vanished member's update: re-formed only keeping it (its place is known)
    assert not may_reform(masked, held, 10)
    pieces = {"round": "ab", "phases": {"dense": {"pieces": [[0, 5, True]], "abs": 1.0}}}
    described = RoundResult(**{**held.__dict__, "held_pieces": pieces})
    assert may_reform(masked, described, 10)
    assert not may_reform(plain, RoundResult(**{**failed.__dict__, "unreachable": ("x", "y")}), 10)  # 1 left
    assert not may_reform(plain, RoundResult(**{**failed.__dict__, "reason": "group members were at different"}), 10)
    assert not may_reform(plain, failed, 11)


def test_a_round_runs_again_only_when_the_members_it_missed_never_started_it() -> None:
    # A member that answered "never started that all-reduce" is alive and still looking for a group at this step: the
    # same update goes again. A member that is gone, a held piece of the result, or another step: no.
    missed = RoundResult(
        committed=False, group_size=2, reason="incomplete all-reduce: member x: this peer never started it",
        max_group_step=10, min_group_step=10, unreachable=("x",), not_joined=("x",),
    )  # fmt: skip
    assert may_retry(missed, 10)
    assert not may_retry(missed, 11)
    assert not may_retry(RoundResult(**{**missed.__dict__, "not_joined": ()}), 10)  # x may be dead
    assert not may_retry(RoundResult(**{**missed.__dict__, "unreachable": ("x", "y")}), 10)  # y may be dead
    assert not may_retry(RoundResult(**{**missed.__dict__, "held": True}), 10)
    assert not may_retry(RoundResult(**{**missed.__dict__, "committed": True}), 10)
    assert not may_retry(RoundResult(**{**missed.__dict__, "reason": "group members were at different steps"}), 10)


def test_a_re_formed_masked_round_needs_exactly_the_members_left_each_re_forming_it() -> None:
    from hivemind.averaging.group_info import GroupInfo
    from hivemind.p2p import PeerID

    from p2pfed.allreduce import _reform_refusal

    a, b, c = (PeerID(b"\x00\x04" + name) for name in (b"aaaa", b"bbbb", b"cccc"))
    pair = GroupInfo(b"g", (a, b), (b"", b""))
    left = sorted(p.to_base58() for p in (a, b))
    assert _reform_refusal(pair, [{"reform": []}, {}]) == ""  # plain rounds claim nothing
    assert _reform_refusal(pair, [{"reform": left}, {"reform": list(reversed(left))}]) == ""
    # a member that is not re-forming this round (it holds a piece of the failed result, or it is another round's)
    assert "exactly the members left" in _reform_refusal(pair, [{"reform": left}, {"reform": []}])
    # a member left of the failed round is missing from the new group (it holds a piece and stayed out)
    three = sorted(p.to_base58() for p in (a, b, c))
    assert "exactly the members left" in _reform_refusal(pair, [{"reform": three}, {"reform": three}])
    assert "malformed" in _reform_refusal(pair, [{"reform": "x"}, {"reform": left}])


def test_a_failed_masked_round_with_a_relayed_member_keeps_no_pieces() -> None:
    from hivemind.p2p import PeerID

    from p2pfed.allreduce import _relayed

    a, b, c, relay = (PeerID(b"\x00\x04" + name) for name in (b"aaaa", b"bbbb", b"cccc", b"rrrr"))
    assert _relayed([a, b], {b: relay})  # b's replies pass through a relay that can keep them
    assert not _relayed([a, b], {c: relay})  # a relayed peer of another round
    assert not _relayed([a, b], {})


def test_the_pieces_members_hold_of_a_failed_masked_round_must_name_one_round() -> None:
    from p2pfed.allreduce import _held_claims

    p = {"pieces": [[0, 5, True], [5, 9, False]], "abs": 2.0}
    one = {"round": "ab", "phases": {"p": p, "q": {"pieces": [[0, 3, True]], "abs": 1.0}}}
    other = {"round": "ab", "phases": {"p": {"pieces": [[0, 5, True]], "abs": 3.0}}}
    assert _held_claims([{}, {"held": None}]) is None  # a plain round
    claims = _held_claims([{"held": one}, {"held": other}])
    assert claims == ("ab", {"p": [[(0, 5, True), (5, 9, False)], [(0, 5, True)]], "q": [[(0, 3, True)], []]},
                      {"p": 3.0, "q": 1.0})  # fmt: skip
    assert "different rounds" in str(_held_claims([{"held": one}, {"held": {**other, "round": "cd"}}]))
    for bad in (
        {**one, "phases": {"p": {**p, "pieces": [[3, 3, True]]}}},
        {**one, "phases": {"p": {**p, "abs": "x"}}},
        {**one, "phases": [1]},
        {**one, "round": "not hex"},
        None,
    ):
        assert "malformed" in str(_held_claims([{"held": one}, {"held": bad}])), bad


def test_a_member_that_vanishes_mid_ring_round_costs_the_others_no_inner_steps(
    launcher: Launcher, tmp_path: Path
) -> None:
    # Prepare: three peers in DiLoCo rounds that go around a ring over direct TCP; the third SIGKILLs its whole process
    # group in its second round's all-reduce, as soon as a piece of another member's mean is back to it. The member
    # before it can no longer send to it, the one after it stops hearing from it: both must name it, and only it, to
    # re-form the same round of two with the same updates. (With more members, the others hear it from these two:
    # tests/test_ring.py.)
    steps, inner = 30, 5
    ring = ("--set", "averaging.schedule=ring", "--set", "averaging.transport=tcp")

    first = _diloco_peer(launcher, tmp_path, 0, steps, inner, *ring)
    join = ("--initial-peers", first.bootstrap())
    survivor = _diloco_peer(launcher, tmp_path, 1, steps, inner, *ring, *join)
    victim = _diloco_peer(launcher, tmp_path, 2, steps, inner, *ring, *join, "--die-in-round", "2")

    # Execute
    assert victim.wait(timeout=300) == -9, victim.stderr()[-3000:]
    assert "dying in the middle of round 2" in victim.stderr() + victim.stdout()
    codes = [p.wait(timeout=300) for p in (first, survivor)]

    # Assert: the round the victim left was re-formed by the two others and committed, so no phase of inner steps was
    # lost; they end with the same parameters, having learned
    assert codes == [0, 0], [p.stderr()[-3000:] for p in (first, survivor)]
    assert all("all-reduces go around a ring" in p.stderr() for p in (first, survivor))
    for i in (0, 1):
        report = json.loads((tmp_path / f"peer{i}.json").read_text())
        counts = {k: report[k] for k in ("rounds_ok", "rounds_failed", "rounds_reformed", "state_downloads")}
        assert report["final_step"] == steps
        assert report["rounds_reformed"] == 1 and report["rounds_failed"] == 0, counts
        assert report["rounds_ok"] == steps // inner, counts
        assert report["eval_loss"] < report["initial_eval_loss"] - 0.5
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in (0, 1)])
    assert divergence is not None and divergence < 1e-4


def test_a_member_that_vanishes_mid_round_costs_the_others_no_inner_steps(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: three peers in masked DiLoCo rounds; the third SIGKILLs its whole process group (main, DHT, averager,
    # p2pd) in the all-reduce of its second round, as soon as the first averaged piece is back to it, as a machine
    # that vanishes mid-transfer would. The reducer of that piece holds a piece of the result, a mean with the third's
    # update: the two others re-form the round with the same updates under fresh masks, keeping the pieces they hold.
    # (Plain rounds re-form by the same phases.run_round, overlapped ones too.)
    steps, inner = 30, 5

    def peer(i: int, *extra: str) -> PeerProcess:
        masked = ("--set", "privacy.secure_aggregation=true", "--set", "compression.name=uint8")
        return _diloco_peer(launcher, tmp_path, i, steps, inner, *masked, *extra)

    first = peer(0)
    join = ("--initial-peers", first.bootstrap())
    survivor, victim = peer(1, *join), peer(2, *join, "--die-in-round", "2")

    # Execute: all three train until the victim vanishes; the other two finish
    assert victim.wait(timeout=300) == -9, victim.stderr()[-3000:]
    assert "dying in the middle of round 2" in victim.stderr() + victim.stdout()
    codes = [p.wait(timeout=300) for p in (first, survivor)]

    # Assert: the round the victim left was re-formed by the two others and committed, keeping what they held of its
    # result, so no phase of inner steps was thrown away; they end with the same parameters, having learned
    assert codes == [0, 0], [p.stderr()[-3000:] for p in (first, survivor)]
    assert any("values of its result this peer holds" in p.stderr() for p in (first, survivor))
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in (0, 1)]
    for report in reports:
        assert report["final_step"] == steps
        counts = {k: report[k] for k in ("rounds_ok", "rounds_failed", "rounds_reformed", "state_downloads")}
        assert report["rounds_reformed"] == 1, (counts, [p.stderr()[-2000:] for p in (first, survivor)])
        assert report["rounds_failed"] == 0 and report["rounds_ok"] == steps // inner, report
        assert report["eval_loss"] < report["initial_eval_loss"] - 0.5
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in (0, 1)])
    assert divergence is not None and divergence < 1e-4
    assert group_members({victim.pgid}) == []  # nothing of the victim is left
    assert wait_no_leftovers(launcher) == []


def test_a_peer_that_misses_a_round_takes_the_new_outer_point_and_rejoins_the_next(
    launcher: Launcher, tmp_path: Path
) -> None:
    # Prepare: three peers in DiLoCo phases of several seconds (slower emulated hardware); the third is frozen whole
    # (SIGSTOP of its process group, as a stall on an overloaded machine) early in its second phase, for longer than
    # the others wait for a member and less than a phase. It misses that round, which the two others average
    # without it: at the same step, its outer point is now one round behind theirs.
    steps, inner = 160, 40
    profile = slow_profile(tmp_path, 20.0)

    def peer(i: int, *extra: str) -> PeerProcess:
        quick = ("--set", "averaging.matchmaking_time=2", "--set", "averaging.request_timeout=1")
        return _diloco_peer(
            launcher, tmp_path, i, steps, inner, "--profile", profile, *quick,
            "--set", "training.eval_every=1000", *extra,
        )  # fmt: skip

    first = peer(0)
    join = ("--initial-peers", first.bootstrap())
    peers = [first, peer(1, *join), peer(2, *join)]
    stalled = peers[2]
    deadline = time.monotonic() + 180
    while stalled.progress_step() < inner:  # its first round is done: the second phase has begun
        assert time.monotonic() < deadline and stalled.proc.poll() is None, stalled.stderr()[-3000:]
        time.sleep(0.05)

    # Execute
    os.killpg(stalled.pgid, signal.SIGSTOP)
    time.sleep(3.5)
    os.killpg(stalled.pgid, signal.SIGCONT)
    codes = [p.wait(timeout=300) for p in peers]

    # Assert: the stalled peer missed that one round, downloaded the others' new outer point at once, and with a
    # shorter next phase was back in the rounds after it; all three end with the same parameters. (Before, it kept
    # its old outer point and began each phase as late as the first, missing every round to the end of the run.)
    assert codes == [0, 0, 0], [p.stderr()[-3000:] for p in peers]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(3)]
    phases = steps // inner
    late = reports[2]
    counts = {k: late[k] for k in ("rounds_ok", "rounds_failed", "state_downloads")}
    assert late["rounds_failed"] >= 1 and late["state_downloads"] >= 1, (counts, stalled.stderr()[-3000:])
    assert late["rounds_ok"] >= phases - 2, (counts, stalled.stderr()[-3000:])
    assert "behind the swarm's" in stalled.stderr(), stalled.stderr()
    divergence = max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(3)])
    assert divergence is not None and divergence < 1e-4
    assert wait_no_leftovers(launcher) == []


def _diloco_peer(launcher: Launcher, tmp_path: Path, i: int, steps: int, inner: int, *extra: str) -> PeerProcess:
    """Peer i of three in blocking DiLoCo rounds, with its own third of the data, its report and its parameters."""
    return launcher.start(
        "peer", "--config", TINY, "--max-steps", str(steps), "--events", "jsonl",
        "--set", "averaging.mode=diloco", "--set", f"averaging.inner_steps={inner}", "--set", "averaging.overlap=false",
        "--set", "swarm.min_peers=3", "--set", "data.num_partitions=3", "--set", f"data.partition_index={i}",
        "--report", str(tmp_path / f"peer{i}.json"), "--save-params", str(tmp_path / f"peer{i}.safetensors"),
        *extra, name=f"peer{i}",
    )  # fmt: skip
