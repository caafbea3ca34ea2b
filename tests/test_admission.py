"""Swarm admission (p2pfed/admission.py): a peer with the wrong swarm key, given the right bootstrap address, never
takes part in a round and never receives another peer's update, while the two keyed peers train together (one of
them taking its parts on direct TCP, sealed with the key); the keyed peers' logs say why in one line. Also: key
files, tokens and the lists, and sealed DHT records.

.venv/bin/python -m pytest -q tests/test_admission.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hivemind.dht.validation import DHTRecord

from p2pfed.admission import Admission, SealedRecords, read_swarm_key, write_swarm_key
from p2pfed.errors import UserError
from tests.conftest import TINY, Launcher, wait_no_leftovers

STEPS = 60


def test_swarm_key_files_tokens_and_lists(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    write_swarm_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    key = read_swarm_key(path)
    assert len(key) == 32
    with pytest.raises(UserError, match="refusing to overwrite"):
        write_swarm_key(path)
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(UserError, match="not a p2pfed swarm key"):
        read_swarm_key(tmp_path / "bad.key")

    ours, theirs = Admission(key), Admission(bytes(32))
    me = b"peer-a"
    assert ours.check(me, ours.token(me), name="A") == ""
    assert "does not hold" in ours.check(me, theirs.token(me), name="A")  # another swarm's key
    assert "does not hold" in ours.check(me, ours.token(b"peer-b"), name="A")  # someone else's token
    assert "does not hold" in ours.check(me, None, name="A")
    assert "privacy.revoke" in Admission(key, revoke=["A"]).check(me, ours.token(me), name="A")
    assert "privacy.allow" in Admission(key, allow=["B"]).check(me, ours.token(me), name="A")


def test_sealed_records_cannot_be_read_or_forged_without_the_key() -> None:
    ours, theirs = SealedRecords(b"k" * 32), SealedRecords(b"x" * 32)
    record = DHTRecord(key=b"run.peers", subkey=b"peer-a", value=b"announcement", expiration_time=1e9)
    sealed = DHTRecord(record.key, record.subkey, ours.sign_value(record), record.expiration_time)
    assert b"announcement" not in sealed.value
    assert ours.validate(sealed) and ours.strip_value(sealed) == b"announcement"
    assert not theirs.validate(sealed)  # another key cannot open it
    assert not ours.validate(record)  # a plain record is rejected
    moved = DHTRecord(record.key, b"peer-b", sealed.value, record.expiration_time)
    assert not ours.validate(moved)  # nor can a sealed value be replayed under another subkey


@pytest.mark.slow
def test_a_peer_without_the_key_never_joins_a_round(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: the swarm's key, and another one
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    for path in (good, bad):
        assert launcher.start("keygen", "--out", str(path), name=f"keygen-{path.stem}").wait(timeout=60) == 0

    def peer(name: str, key: Path, *extra: str) -> object:
        return launcher.start(
            "peer", "--config", TINY, "--max-steps", str(STEPS), "--events", "jsonl",
            "--set", f"privacy.swarm_key={key}", "--report", str(tmp_path / f"{name}.json"), *extra, name=name,
        )  # fmt: skip

    # Execute: a keyed peer (private, too) that waits for a second; an intruder given the right bootstrap address
    # but the wrong key; `status` with the key while the first peer waits; then the second keyed peer
    a = peer("a", good, "--set", "swarm.min_peers=2", "--set", "privacy.dp=true")
    address = a.bootstrap()  # type: ignore[attr-defined]
    c = peer("c", bad, "--set", "swarm.min_peers=1", "--initial-peers", address)
    a.wait_for('"kind": "waiting"', timeout=120)  # type: ignore[attr-defined]
    keyed = launcher.start("status", "--initial-peers", address, "--swarm-key", str(good), "--json", name="status")
    assert keyed.wait(timeout=60) == 0, keyed.stderr()
    (run,) = [r for r in json.loads(keyed.stdout()) if r["run_id"] == "tiny"]
    assert [p["epsilon"] for p in run["peers"]] == [0.0]  # a alone, private, no step yet; never c
    # b takes parts on direct TCP (sealed with the key), a over libp2p: both ways are covered
    b = peer(
        "b", good, "--set", "swarm.min_peers=2", "--set", "privacy.dp=true", "--set", "averaging.transport=tcp",
        "--initial-peers", address,
    )  # fmt: skip
    for proc in (a, b, c):
        assert proc.wait(timeout=300) == 0, proc.stderr()[-3000:]  # type: ignore[attr-defined]

    # Assert: a and b averaged with each other only; c never averaged, sent or received an update
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in "abc"}
    for name in "ab":
        assert reports[name]["rounds_ok"] >= STEPS // 2, reports[name]
        assert reports[name]["rounds_failed"] <= 2
    assert reports["c"]["rounds_ok"] == 0
    assert reports["c"]["bytes_sent"] == 0 and reports["c"]["bytes_received"] == 0
    assert reports["c"]["state_downloads"] == 0
    # each of a's rounds moved one 2-member all-reduce of its fp32 gradient, nothing for a third member
    vector = 4 * reports["a"]["parameters"]
    assert reports["a"]["bytes_sent"] <= 1.02 * (reports["a"]["rounds_ok"] + reports["a"]["rounds_failed"]) * vector
    logs = a.stderr() + a.stdout() + b.stderr() + b.stdout()  # type: ignore[attr-defined]
    assert "not sealed with this swarm's key" in logs
    assert wait_no_leftovers(launcher) == []


def test_the_averagers_guarded_handlers_stay_streaming_rpcs() -> None:
    # hivemind derives each handler's wire types from its annotations: a wrong one silently breaks matchmaking
    from p2pfed.allreduce import SwarmAverager

    SwarmAverager._collect_rpc_handlers()
    handlers = {h.method_name: h for h in SwarmAverager._rpc_handlers or []}
    for name in ("rpc_join_group", "rpc_download_state"):
        assert handlers[name].stream_output, name


def test_a_peer_that_reads_the_dht_but_lacks_the_admission_key_is_refused_by_every_group() -> None:
    # Prepare: three averagers that can all read the swarm's DHT; the third proves membership with another key.
    # (An intruder that leads a group instead gets no data either: every member checks every other member's proof
    # before the all-reduce starts, so the round fails without a byte of an update moving.)
    import hivemind
    import torch

    from p2pfed.allreduce import SwarmAverager

    key = b"k" * 32
    options = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False, start=True)
    dhts = [hivemind.DHT(record_validators=[SealedRecords(key)], **options)]
    bootstrap = [str(m) for m in dhts[0].get_visible_maddrs()]
    dhts += [hivemind.DHT(initial_peers=bootstrap, record_validators=[SealedRecords(key)], **options) for _ in "bc"]
    keys = [key, key, b"x" * 32]
    averagers = [
        SwarmAverager(
            [torch.full((8,), float(i))],
            dht,
            prefix="admission_test",
            target_group_size=3,
            min_group_size=2,
            min_matchmaking_time=3.0,
            request_timeout=1.0,
            allreduce_timeout=10.0,
            admission=Admission(k),
            client_mode=i == 2,  # the intruder asks to join (a leader it lured would fail its round: see above)
            start=True,
        )
        for i, (dht, k) in enumerate(zip(dhts, keys, strict=True))
    ]
    try:
        # Execute
        # (the intruder gives up after 6 s: long enough to have asked every group that formed)
        controls = [a.step(wait=False, timeout=20 if i < 2 else 6, allow_retries=True) for i, a in enumerate(averagers)]
        outcomes = []
        for control in controls:
            try:
                outcomes.append(control.result(60))
            except Exception as e:  # the intruder finds no group that will have it
                outcomes.append(e)
        # Assert: the two admitted peers averaged 0 and 1 between them; the intruder's tensor was never touched
        for i in (0, 1):
            assert isinstance(outcomes[i], dict) and outcomes[i]["complete"], outcomes[i]
            assert len(outcomes[i]["gathered"]) == 2
            with averagers[i].get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.full((8,), 0.5))
        assert not (isinstance(outcomes[2], dict) and outcomes[2]["complete"])
        with averagers[2].get_tensors() as (tensor,):
            assert torch.equal(tensor, torch.full((8,), 2.0))
    finally:
        for a in averagers:
            a.shutdown()
        for d in dhts:
            d.shutdown()
