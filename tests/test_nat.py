"""Peers that cannot accept connections train with the swarm. As root, three peers run in network namespaces joined
by a bridge, and the namespaces of peers 1 and 2 drop every TCP connection attempt that reaches them (as behind a
NAT without port forwarding); without root, on loopback (where the same paths are taken, though not forced).

- Peer 1 dials out only (profile client_mode: true): it averages through the others and reduces nothing.
- Peer 2 is relayed (profile relay: true): its bootstrap peer forwards the other members' streams to it, and it
  reduces its share like any member.

.venv/bin/python -m pytest -q tests/test_nat.py
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from p2pfed.bench.wan import WanNet
from p2pfed.errors import UserError
from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, PeerProcess, netns_works, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 30


@contextmanager
def _net(blocked: tuple[int, ...]) -> Iterator[WanNet | None]:
    """Three namespaces on a bridge (1 Gbit/s links), the `blocked` ones unreachable from outside; None without
    root."""
    if not netns_works():
        yield None
        return
    wan = WanNet(3, rate_mbit=1000.0)
    try:
        wan.build()
        for i in blocked:
            wan.block_inbound(i)
    except UserError as e:  # a kernel without what the test needs
        wan.destroy()
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        yield wan
    finally:
        wan.destroy()
        assert wan.leftovers() == []


def _profile(tmp_path: Path, name: str, key: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(Path(CPU_PROFILE).read_text().replace(f"{key}: false", f"{key}: true"))
    return path


def _train(launcher: Launcher, tmp_path: Path, net: WanNet | None, profiles: list[Path | str]) -> list[dict[str, Any]]:
    """Three peers, the first one the others' bootstrap peer, each with its profile; their reports."""

    def start(i: int, extra: list[str]) -> PeerProcess:
        listen = f"/ip4/{net.address(i)}/tcp/0" if net is not None else "/ip4/127.0.0.1/tcp/0"
        prefix = ("ip", "netns", "exec", net.names[i]) if net is not None else ()
        return launcher.start(
            "peer", "--config", TINY, "--profile", str(profiles[i]), "--max-steps", str(STEPS), "--events", "jsonl",
            "--listen", listen, "--set", "swarm.min_peers=3", "--set", "data.num_partitions=3",
            "--set", f"data.partition_index={i}", "--report", str(tmp_path / f"peer{i}.json"),
            "--save-params", str(tmp_path / f"peer{i}.safetensors"), *extra, name=f"peer{i}", prefix=prefix,
        )  # fmt: skip

    first = start(0, [])
    bootstrap = first.bootstrap()
    peers = [first, start(1, ["--initial-peers", bootstrap]), start(2, ["--initial-peers", bootstrap])]
    codes = [p.wait(timeout=240) for p in peers]
    assert codes == [0, 0, 0], [p.stderr()[-3000:] for p in peers]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(3)]
    for r in reports:  # all three trained together to the same parameters
        assert r["final_step"] == STEPS and r["rounds_ok"] >= STEPS - 3
        assert r["eval_loss"] < r["initial_eval_loss"] - 1.0
    assert max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(3)]) < 1e-4
    assert wait_no_leftovers(launcher) == []
    return reports


def test_peers_behind_nat_train_as_a_client_and_through_a_relay(launcher: Launcher, tmp_path: Path) -> None:
    with _net(blocked=(1, 2)) as net:
        # Prepare: peer 1 dials out only (client_mode), peer 2 takes its streams through its bootstrap peer (relay);
        # as root, proof that nobody can dial into their namespaces while they can dial out
        if net is not None:
            assert net.dial(0, 1) == "timeout" and net.dial(0, 2) == "timeout" and net.dial(1, 2) == "timeout"
            assert net.dial(1, 0) == "refused" and net.dial(2, 0) == "refused"  # a path out (no one on port 9)
        client, relayed = _profile(tmp_path, "client", "client_mode"), _profile(tmp_path, "relayed", "relay")

        # Execute
        reports = _train(launcher, tmp_path, net, [CPU_PROFILE, client, relayed])

    # Assert: peers 0 and 2 reduced half of every round's vector each, the client none. Per round the client sends
    # each reducer its half (the whole vector out); a reducer sends the other reducer its half of that one's slice
    # and its slice's mean to the two others (1.5 vectors); the relay forwarded the client's half to peer 2 and the
    # mean coming back (one vector), which could reach peer 2 only through it. Nothing of peer 0's own went through
    # a relay.
    # A round that failed on a loaded machine may have sent up to a round's bytes before it failed.
    vector = 4 * reports[0]["parameters"]
    rounds, failed = reports[1]["rounds_ok"], sum(r["rounds_failed"] for r in reports)

    def per_round(value: int, share: float) -> None:
        assert 0.98 * rounds * share * vector <= value <= 1.02 * (rounds + failed) * share * vector, (value, share)

    per_round(reports[1]["bytes_sent"], 1.0)
    per_round(reports[0]["bytes_sent"], 1.5)
    per_round(reports[2]["bytes_sent"], 1.5)
    per_round(reports[0]["bytes_forwarded"], 1.0)
    assert reports[1]["bytes_forwarded"] == reports[2]["bytes_forwarded"] == 0
