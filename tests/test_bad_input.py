"""Bad input: one clear line on stderr, a non-zero exit, quickly, and no traceback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import CPU_PROFILE, TINY, Launcher, wait_no_leftovers

# A well-formed peer id nobody listens for, on a port nobody listens on.
_ABSENT_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWQzfeUBkc1WVAFp3wfB8DkVx34YpUJsK6fbTYp8WAjk4f"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["peer", "--config", TINY, "--initial-peers", "not-a-multiaddr"], "not-a-multiaddr"),
        (["peer", "--config", TINY, "--initial-peers", "/ip4/127.0.0.1/tcp/9"], "peer id"),
        (
            ["peer", "--config", TINY, "--initial-peers", _ABSENT_PEER, "--set", "swarm.bootstrap_retry_s=4"],
            "could not reach",
        ),  # fmt: skip
        (["peer", "--config", TINY, "--set", "averaging.bogus=1"], "averaging.bogus"),
        (["peer", "--config", TINY, "--set", "averaging.timeout=-5"], "averaging.timeout"),
        (["peer", "--config", "/nonexistent/run.yaml"], "does not exist"),
        (["swarm", "--peers", "2", "--config", TINY, "--set", "modle.arch=llama"], "modle"),
        (["status", "--initial-peers", _ABSENT_PEER, "--timeout", "4"], "could not reach"),
        (["peer", "--config", TINY, "--profile", "RELAYED"], "needs --initial-peers"),
        (["peer", "--config", TINY, "--profile", "BOTH"], "client_mode and relay exclude each other"),
        (["peer", "--config", TINY, "--set", "training.lr_schedule=cosine"], "--max-steps"),
        (["bench", "allreduce", "--sealed"], "--transport tcp"),
    ],
    ids=[
        "malformed", "no-peer-id", "unreachable", "unknown-key", "bad-value", "missing-config", "swarm-key", "status",
        "relay-alone", "relay-and-client", "schedule-without-end", "sealed-without-tcp",
    ],
)  # fmt: skip
def test_bad_input_exits_with_one_line(launcher: Launcher, tmp_path: Path, args: list[str], expected: str) -> None:
    # Prepare: the profiles named in capitals (a relayed peer; one that claims both ways of living behind NAT)
    profile = Path(CPU_PROFILE).read_text()
    relayed = profile.replace("relay: false", "relay: true")
    profiles = {"RELAYED": relayed, "BOTH": relayed.replace("client_mode: false", "client_mode: true")}
    for i, arg in enumerate(args):
        if arg in profiles:
            (tmp_path / f"{arg}.yaml").write_text(profiles[arg])
            args = [*args[:i], str(tmp_path / f"{arg}.yaml"), *args[i + 1 :]]

    # Execute
    t0 = time.monotonic()
    proc = launcher.start(*args, name="bad")
    code = proc.wait(timeout=30)
    elapsed = time.monotonic() - t0

    # Assert
    lines = [line for line in proc.stderr().splitlines() if line.strip()]
    assert code == 2, proc.stderr()
    assert elapsed < 30
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in proc.stderr() + proc.stdout()
    assert wait_no_leftovers(launcher) == []
