"""Peers that cannot accept connections train with the swarm. As root, three peers run in network namespaces joined
by a bridge, and a blocked peer's namespace drops every TCP connection attempt that reaches it (as behind a NAT
without port forwarding).

- A dial-out-only peer (profile client_mode: true) joins, trains and averages with two peers that accept connections
  (without root: on loopback).
- Two peers behind NAT (profile relay: true) take connections through a circuit relay at their bootstrap peer, and
  are full members: each reduces a slice of every round, so they exchange bytes that can reach them only through the
  relay (root only: on loopback nothing would need the relay).

.venv/bin/python -m pytest -q tests/test_nat.py
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from p2pfed.bench.wan import WanNet
from p2pfed.errors import UserError
from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, PeerProcess, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 30


def _netns_works() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    return probe.returncode == 0


@contextmanager
def _net(blocked: tuple[int, ...]) -> Iterator[WanNet | None]:
    """Three namespaces on a bridge (1 Gbit/s links), the `blocked` ones unreachable from outside; None without
    root."""
    if not _netns_works():
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


def test_a_dial_out_only_peer_trains_and_averages_with_the_others(launcher: Launcher, tmp_path: Path) -> None:
    with _net(blocked=(2,)) as net:
        # Prepare: the client's profile, and (as root) proof that nobody can dial into its namespace while it can
        # dial out
        if net is not None:
            assert net.dial(0, 2) == "timeout" and net.dial(1, 2) == "timeout"
            assert net.dial(2, 0) == "refused"  # reached peer 0's machine (no one listens on port 9): a path out

        # Execute
        client = _profile(tmp_path, "client", "client_mode")
        reports = _train(launcher, tmp_path, net, [CPU_PROFILE, CPU_PROFILE, client])

    # Assert: the client reduced no one's slice (it sends its update to the two reducers and gets the means back),
    # the others reduced one slice each
    vector = 4 * reports[0]["parameters"]
    rounds = reports[2]["rounds_ok"]
    assert reports[2]["bytes_sent"] == pytest.approx(rounds * vector, rel=0.02)  # two halves, one to each reducer
    assert reports[0]["bytes_sent"] > 1.3 * reports[2]["bytes_sent"]  # a reducer also sends back its means


def test_two_peers_behind_nat_average_through_a_relay(launcher: Launcher, tmp_path: Path) -> None:
    if not _netns_works():
        pytest.skip("needs root for network namespaces: on loopback every peer is reachable and no relay is used")
    with _net(blocked=(1, 2)) as net:
        # Prepare: peers 1 and 2 cannot be dialed by anyone, peer 0 (their bootstrap peer, and so their relay) can
        assert net is not None
        assert net.dial(1, 2) == "timeout" and net.dial(2, 1) == "timeout" and net.dial(0, 1) == "timeout"
        assert net.dial(1, 0) == "refused"
        relayed = _profile(tmp_path, "relayed", "relay")

        # Execute
        reports = _train(launcher, tmp_path, net, [CPU_PROFILE, relayed, relayed])

    # Assert: all three reduced a slice of every round (4/3 of the vector out per round: two thirds of its update
    # to the other reducers, two thirds of its averaged slice back), and the relay carried what peers 1 and 2 sent
    # each other (each one's part of the other's slice and the mean coming back, a third of the vector each: 4/3 of
    # the vector a round in all), which could reach them only through it
    vector = 4 * reports[0]["parameters"]
    for r in reports:
        assert r["bytes_sent"] == pytest.approx(r["rounds_ok"] * vector * 4 / 3, rel=0.03)
    assert reports[0]["bytes_forwarded"] == pytest.approx(reports[1]["rounds_ok"] * vector * 4 / 3, rel=0.03)
    assert reports[1]["bytes_forwarded"] == reports[2]["bytes_forwarded"] == 0
