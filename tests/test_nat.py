"""A peer that can only dial out (profile client_mode: true) joins, trains and averages with two peers that accept
connections. As root, the three run in network namespaces joined by a bridge, and the client's namespace drops every
TCP connection attempt that reaches it (as behind a NAT without port forwarding); without root, on loopback.

.venv/bin/python -m pytest -q tests/test_nat.py
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfed.bench.wan import WanNet
from p2pfed.errors import UserError
from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 30


def _netns_works() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.fixture
def net() -> Iterator[WanNet | None]:
    """Three namespaces on a bridge (1 Gbit/s links), the third unreachable from outside; None without root."""
    if not _netns_works():
        yield None
        return
    wan = WanNet(3, rate_mbit=1000.0)
    try:
        wan.build()
        wan.block_inbound(2)
    except UserError as e:  # a kernel without what the test needs: run on loopback instead
        wan.destroy()
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        yield wan
    finally:
        wan.destroy()
        assert wan.leftovers() == []


def test_a_dial_out_only_peer_trains_and_averages_with_the_others(
    launcher: Launcher, tmp_path: Path, net: WanNet | None
) -> None:
    # Prepare: the client's profile, and (as root) proof that nobody can dial into its namespace while it can dial out
    client = tmp_path / "client.yaml"
    client.write_text(Path(CPU_PROFILE).read_text().replace("client_mode: false", "client_mode: true"))
    if net is not None:
        assert net.dial(0, 2) == "timeout" and net.dial(1, 2) == "timeout"
        assert net.dial(2, 0) == "refused"  # reached peer 0's machine (no one listens on port 9): a path out

    def start(i: int, profile: Path | str, extra: list[str]) -> object:
        listen = f"/ip4/{net.address(i)}/tcp/0" if net is not None else "/ip4/127.0.0.1/tcp/0"
        prefix = ("ip", "netns", "exec", net.names[i]) if net is not None else ()
        return launcher.start(
            "peer", "--config", TINY, "--profile", str(profile), "--max-steps", str(STEPS), "--events", "jsonl",
            "--listen", listen, "--set", "swarm.min_peers=3", "--set", "data.num_partitions=3",
            "--set", f"data.partition_index={i}", "--report", str(tmp_path / f"peer{i}.json"),
            "--save-params", str(tmp_path / f"peer{i}.safetensors"), *extra, name=f"peer{i}", prefix=prefix,
        )  # fmt: skip

    # Execute
    first = start(0, CPU_PROFILE, [])
    bootstrap = first.bootstrap()  # type: ignore[attr-defined]
    peers = [
        first,
        start(1, CPU_PROFILE, ["--initial-peers", bootstrap]),
        start(2, client, ["--initial-peers", bootstrap]),
    ]
    codes = [p.wait(timeout=240) for p in peers]  # type: ignore[attr-defined]

    # Assert: all three trained together to the same parameters; the client reduced no one's slice (it sends its
    # update to the two reducers and gets the means back), the others reduced one slice each
    assert codes == [0, 0, 0], [p.stderr()[-3000:] for p in peers]  # type: ignore[attr-defined]
    reports = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(3)]
    for r in reports:
        assert r["final_step"] == STEPS and r["rounds_ok"] >= STEPS - 3
        assert r["eval_loss"] < r["initial_eval_loss"] - 1.0
    assert max_param_divergence([tmp_path / f"peer{i}.safetensors" for i in range(3)]) < 1e-4
    vector = 4 * reports[0]["parameters"]
    rounds = reports[2]["rounds_ok"]
    assert reports[2]["bytes_sent"] == pytest.approx(rounds * vector, rel=0.02)  # two halves, one to each reducer
    assert reports[0]["bytes_sent"] > 1.3 * reports[2]["bytes_sent"]  # a reducer also sends back its means
    assert wait_no_leftovers(launcher) == []
