"""Helpers for tests that start real peer processes on loopback, and for tests of the all-reduce on real p2pd daemons.

Every process is started in its own session (its own process group), so teardown can kill the peer together with
its DHT, averager and p2pd children; tests then assert that nothing of theirs is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hivemind.p2p import P2P

from p2pfed.butterfly import Butterfly

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
CPU_PROFILE = str(ROOT / "peers" / "local-cpu.yaml")


def slow_profile(directory: Path, slowdown: float) -> str:
    """CPU_PROFILE emulating hardware `slowdown` times slower (profile.slowdown), written into `directory`."""
    profile = directory / "slow.yaml"
    profile.write_text(Path(CPU_PROFILE).read_text().replace("slowdown: 1.0", f"slowdown: {slowdown}"))
    return str(profile)


def netns_works() -> bool:
    """Whether this process may create network namespaces (root, with `ip netns` working)."""
    if os.geteuid() != 0:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = "(gone)"
    return f"{pid}: {cmd[:160]}"


def cmdline_matches(needle: str) -> list[int]:
    """PIDs (this one excluded) whose command line mentions `needle`; forked DHT/averager children keep it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in cmd and state != "Z":
                found.append(int(entry.name))
    return found


def group_members(pgids: set[int]) -> list[int]:
    """PIDs (zombies excluded) whose process group is one of `pgids`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid in pgids and state != "Z":
            found.append(int(entry.name))
    return found


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PeerProcess:
    """One `p2pfed ...` process in its own session, stdout/stderr captured to files."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        name: str,
        *,
        launch: tuple[str, ...] = ("-m", "p2pfed"),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *launch, *args],
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
            # Ctrl+C must reach the child as in a terminal, even when the suite itself runs as a background job
            # (a non-interactive shell starts those with SIGINT ignored, and Python keeps an ignored SIGINT)
            preexec_fn=_default_sigint,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, needle: str, timeout: float) -> str:
        """Wait until stdout has a line containing `needle`; return that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stdout().splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {needle!r} within {timeout}s; stderr tail:\n{self.stderr()[-2000:]}")

    def bootstrap(self, timeout: float = 90) -> str:
        return self.wait_for("bootstrap: ", timeout).split("bootstrap: ", 1)[1].strip()

    def progress_step(self) -> int:
        step = 0
        for line in self.stdout().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("kind") == "progress":
                    step = event["step"]
        return step

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s; stderr:\n{self.stderr()[-3000:]}"
            ) from None

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        self._err.close()


class Launcher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[PeerProcess] = []
        self.groups: set[int] = set()

    def start(
        self,
        *args: str,
        name: str | None = None,
        launch: tuple[str, ...] = ("-m", "p2pfed"),
        prefix: tuple[str, ...] = (),
    ) -> PeerProcess:
        """`PREFIX python -m p2pfed ARGS` (or `python LAUNCH ARGS`) in its own session; PREFIX: `ip netns exec NS`."""
        proc = PeerProcess(list(args), self.workdir, name or f"proc{len(self.procs)}", launch=launch, prefix=prefix)
        self.procs.append(proc)
        return proc

    def track_groups(self) -> None:
        """Remember the process groups of everything now running from this test's directory (e.g. swarm peers)."""
        for pid in cmdline_matches(str(self.workdir)):
            try:
                self.groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass

    def leftovers(self) -> list[str]:
        """Processes still alive in any of our process groups or started from this test's directory."""
        pids = set(group_members({p.pgid for p in self.procs} | self.groups)) | set(cmdline_matches(str(self.workdir)))
        return [describe(pid) for pid in sorted(pids)]


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    yield launch
    for proc in launch.procs:
        proc.kill()
    # A failed test must not leave peers behind to slow the rest of the suite: the process groups it tracked (e.g. a
    # swarm's peers, which live in their own sessions) and anything started from its directory go too.
    launch.track_groups()
    for pgid in launch.groups - {os.getpgrp()}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_no_leftovers(launch: Launcher, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = launch.leftovers()
        if not left:
            return []
        time.sleep(0.25)
    return launch.leftovers()


@contextlib.asynccontextmanager
async def butterfly_members(n: int, *, chunk_timeout: float) -> AsyncIterator[list[Butterfly]]:
    """n p2pd daemons on loopback in this process, joined in one swarm, each serving a Butterfly."""
    listen = ["/ip4/127.0.0.1/tcp/0"]
    first = await P2P.create(host_maddrs=listen, nat_port_map=False, auto_nat=False)
    p2ps = [first]
    try:
        maddrs = await first.get_visible_maddrs()
        for _ in range(n - 1):
            p2ps.append(await P2P.create(initial_peers=maddrs, host_maddrs=listen, nat_port_map=False, auto_nat=False))
        butterflies = [Butterfly(p2p, name="test.part", chunk_timeout=chunk_timeout) for p2p in p2ps]
        for b in butterflies:
            await b.serve()
        yield butterflies
    finally:
        for p2p in p2ps:
            await p2p.shutdown()


async def allreduce_all(
    members: list[Butterfly], key: bytes, vectors: list[Any], *, weights: list[float] | None = None, **kwargs: Any
) -> list[Any]:
    """Every member's Butterfly.allreduce of its own vector in one round (equal shares; weight 1 unless given)."""
    peers = [m.p2p.peer_id for m in members]
    weights = weights or [1.0] * len(members)
    calls = [
        m.allreduce(key, peers, i, v, weight=w, shares=[1] * len(members), round=1, timeout=30, **kwargs)
        for i, (m, v, w) in enumerate(zip(members, vectors, weights, strict=True))
    ]
    return list(await asyncio.gather(*calls))
