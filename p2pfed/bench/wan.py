"""WAN emulation: N p2pfed peers, each in its own network namespace behind a rate-limited link. Needs root.

    p2pfed bench wan --peers 3 --rate-mbit 100 --config configs/tiny.yaml --max-steps 60 \
        [--set KEY=VALUE ...] [--run-dir DIR] [--timeout S] [--json]

What it builds, all named `p2pfed-<6 hex>-*` with a fresh random tag per run:

- a hub namespace `...-hub` holding a bridge `br0`, and one namespace `...-<i>` per peer, loopback up in each;
- per peer, a veth pair: `eth0` inside the peer namespace, `h<i>` on the hub's bridge, so no interface of the root
  namespace is created, touched or bridged; peer i gets `10.213.X.<i+1>/24` (X random) on `eth0`, and no other route
  than that subnet's own: no default route, so nothing can leave the namespaces;
- `tc qdisc ... root tbf` on both ends of each veth (peer egress = upload, hub egress = download). tbf reaches its
  rate only if its bucket holds at least what the kernel may send in one timer tick, rate / HZ with HZ >= 250, so
  burst = max(rate / 250, 32 kbit) bytes; `latency` bounds the queue (default 100 ms, plenty of buffer at these rates).

Then one `p2pfed peer` per namespace (`ip netns exec NS python -m p2pfed peer --listen /ip4/<its address>/tcp/0`),
each in its own session; peer 0 first, the rest join through its `bootstrap:` line. Afterwards, always (errors,
timeout, Ctrl+C, SIGTERM): SIGTERM each peer, SIGKILL its process group after a grace period, SIGKILL whatever is
still inside our namespaces, delete them (the veths go with them), and check that none of our namespaces or
processes remain; `leftovers` in the result lists anything that does.

Measured, per peer, from its report: compute_s, wall_s (from the peer's start after its imports: includes the DHT,
loading corpus and model, waiting for the others), bytes_sent, rounds_ok, eval_loss; from the arrival times of its
progress lines, startup_s (launch to first step) and the training window (first to last progress line; interim
evaluations count as non-compute time there). `compute_utilization` is the
mean over peers of compute_s / wall_s, `train_utilization` the same over the training window, `wire_s` the least time
the peer's uplink must be busy for its bytes_sent at the link rate. Before the peers start, `tcp_probe_mbit` times
one raw TCP bulk send from peer 1 to peer 0 across the shaped link (checks the shaping; about 2 s). Every command
here runs under a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE
from types import FrameType
from typing import IO, Any

from p2pfed.errors import UserError

__all__ = ["Interrupts", "WanNet", "WanOptions", "run_wan", "tbf_burst_bytes"]

logger = logging.getLogger(__name__)

CMD_TIMEOUT = 10.0  # seconds for any single ip/tc/probe command
BOOTSTRAP_TIMEOUT = 120.0  # seconds for peer 0 to print its bootstrap address
GRACE_S = 20.0  # seconds after SIGTERM before SIGKILL of a peer's process group
TBF_LATENCY_MS = 100


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Bucket of at least one timer tick at the rate (HZ >= 250) and at least 32 kbit, per tc-tbf(8)."""
    return max(4000, int(rate_mbit * 1e6 / 8 / 250))


def _sh(cmd: str, check: bool = True) -> str:
    """Run one ip/tc command (no shell; names never hold spaces) under CMD_TIMEOUT; a failure is one clear line."""
    done = subprocess.run(cmd.split(), capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if check and done.returncode != 0:
        raise UserError(f"`{cmd}` failed: {done.stderr.strip()}")
    return done.stdout


class Interrupts:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt; `shield()` ignores them while cleaning up (a
    second Ctrl+C must not cut the clean-up short); the handlers in place before come back on exit. Set explicitly:
    a shell starts background jobs with SIGINT ignored, and Python then installs no handler of its own."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> Interrupts:
        self._previous = {sig: signal.signal(sig, _raise_interrupt) for sig in self._SIGNALS}
        return self

    def shield(self) -> None:
        for sig in self._SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class WanNet:
    """A hub namespace with a bridge and one rate-limited namespace per peer; `destroy()` removes all of them."""

    def __init__(self, n_peers: int, rate_mbit: float) -> None:
        self.prefix = f"p2pfed-{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.names = [f"{self.prefix}-{i}" for i in range(n_peers)]
        self.subnet = f"10.213.{secrets.randbelow(256)}"
        self.rate_mbit = rate_mbit
        self.created: list[str] = []

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def _add_ns(self, ns: str) -> None:
        self.created.append(ns)  # recorded first: an interrupt mid-command must still lead to its deletion
        try:
            _sh(f"ip netns add {ns}")
        except UserError as e:
            raise UserError(f"cannot create a network namespace (the WAN benchmark needs root): {e}") from None
        _sh(f"ip -n {ns} link set lo up")

    def _limit(self, ns: str, dev: str) -> None:
        rate, burst = f"{self.rate_mbit:g}mbit", tbf_burst_bytes(self.rate_mbit)
        _sh(f"tc -n {ns} qdisc add dev {dev} root tbf rate {rate} burst {burst} latency {TBF_LATENCY_MS}ms")

    def build(self) -> None:
        if os.geteuid() != 0:
            raise UserError("the WAN benchmark creates network namespaces and needs root")
        hub = self.hub
        self._add_ns(hub)
        _sh(f"ip -n {hub} link add br0 type bridge")
        _sh(f"ip -n {hub} link set br0 up")
        for i, ns in enumerate(self.names):
            self._add_ns(ns)
            _sh(f"ip -n {hub} link add h{i} type veth peer name eth0 netns {ns}")  # born in the hub, not the root
            _sh(f"ip -n {hub} link set h{i} master br0 up")
            _sh(f"ip -n {ns} addr add {self.address(i)}/24 dev eth0")
            _sh(f"ip -n {ns} link set eth0 up")
            self._limit(ns, "eth0")  # upload
            self._limit(hub, f"h{i}")  # download
            if _sh(f"ip -n {ns} route show default").strip():  # the kernel adds none; make sure of it
                raise RuntimeError(f"namespace {ns} has a default route")
        probe = (
            "import socket,sys;s=socket.socket();s.settimeout(3);sys.exit(s.connect_ex((sys.argv[1],9)) not in (0,111))"
        )
        for ns in self.names[1:]:  # a refused (or accepted) connection proves the path; a timeout does not
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", probe, self.address(0)]
            if subprocess.run(cmd, timeout=CMD_TIMEOUT).returncode:
                raise UserError(f"namespace {ns} cannot reach {self.address(0)} across the bridge")

    def block_inbound(self, i: int) -> None:
        """Peer i's namespace gets no TCP connection attempt (a SYN without ACK) from anyone, as behind a NAT or a
        firewall without port forwarding: it can dial out, nobody can dial it. Its download link (the hub's side of
        its veth) becomes an htb whose default class keeps the rate; SYNs go to a class whose queue holds nothing.
        (The match reads the TCP flags at byte 33: a 20-byte IP header, which the IHL match makes sure of.)"""
        hub, dev, rate = self.hub, f"h{i}", f"{self.rate_mbit:g}mbit"
        _sh(f"tc -n {hub} qdisc del dev {dev} root")
        _sh(f"tc -n {hub} qdisc add dev {dev} root handle 1: htb default 20 r2q 100000")
        _sh(f"tc -n {hub} class add dev {dev} parent 1: classid 1:10 htb rate 1mbit quantum 1514")
        _sh(f"tc -n {hub} class add dev {dev} parent 1: classid 1:20 htb rate {rate}")
        _sh(f"tc -n {hub} qdisc add dev {dev} parent 1:10 handle 10: pfifo limit 0")
        _sh(
            f"tc -n {hub} filter add dev {dev} parent 1: protocol ip prio 1 u32 "
            "match ip protocol 6 0xff match u8 0x05 0x0f at 0 match u8 0x02 0x12 at 33 flowid 1:10"
        )

    def dial(self, src: int, dst: int, port: int = 9, timeout: float = 2.0) -> str:
        """'refused', 'connected' or 'timeout': what a TCP connect from peer src to peer dst's port gets."""
        probe = (
            "import socket,sys;s=socket.socket();s.settimeout(float(sys.argv[3]))\n"
            "print(s.connect_ex((sys.argv[1],int(sys.argv[2]))))"
        )
        cmd = ["ip", "netns", "exec", self.names[src], sys.executable, "-c", probe, self.address(dst), str(port)]
        out = subprocess.run([*cmd, str(timeout)], capture_output=True, text=True, timeout=CMD_TIMEOUT).stdout.strip()
        return {"0": "connected", "111": "refused"}.get(out, "timeout")

    def probe_mbit(self, seconds: float = 2.0) -> float | None:
        """Raw TCP goodput from peer 1 to peer 0, Mbit/s: one bulk send of `seconds` worth of bytes at the link rate."""
        server = (
            "import socket,sys,time\ns=socket.create_server((sys.argv[1],5999));print('ready',flush=True)\n"
            "c,_=s.accept();n=0;t=time.monotonic()\nwhile b:=c.recv(1<<16):n+=len(b)\n"
            "print(n*8/(time.monotonic()-t)/1e6)"
        )
        client = "import socket,sys\nsocket.create_connection((sys.argv[1],5999),3).sendall(bytes(int(sys.argv[2])))"
        exe, size = ["ip", "netns", "exec"], str(int(self.rate_mbit * 1e6 / 8 * seconds))
        srv = subprocess.Popen(
            [*exe, self.names[0], sys.executable, "-c", server, self.address(0)], stdout=PIPE, text=True
        )
        try:  # the server prints 'ready' or dies (EOF): readline cannot hang
            ok = srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            cmd = [*exe, self.names[1], sys.executable, "-c", client, self.address(0), size]
            ok = ok and subprocess.run(cmd, timeout=CMD_TIMEOUT + 2 * seconds).returncode == 0
            out = srv.communicate(timeout=CMD_TIMEOUT)[0] if ok else ""
        finally:
            srv.kill()
            srv.wait(timeout=CMD_TIMEOUT)
        return round(float(out), 2) if out.strip() else None

    def all_to_all_s(self, total_bytes: int) -> float | None:
        """Raw TCP for scale: every peer sends `total_bytes`, split evenly, to every other peer at once on connections
        already open and used, and this is the seconds until the last peer has received all of its share (None if a
        peer failed)."""
        exe, n = ["ip", "netns", "exec"], len(self.names)
        addresses = ",".join(self.address(i) for i in range(n))
        size = str(max(1, total_bytes // (n - 1)))
        procs = [
            subprocess.Popen(
                [*exe, ns, sys.executable, "-m", "p2pfed.bench.all_to_all", str(i), addresses, size],
                stdin=PIPE,
                stdout=PIPE,
                text=True,
            )  # fmt: skip
            for i, ns in enumerate(self.names)
        ]
        try:  # each says a word at each stage (or dies: EOF), and goes on when every peer has (bench/all_to_all.py)
            for stage, word in (("listening", "connect"), ("ready", "go")):
                if not all(p.stdout is not None and p.stdout.readline().strip() == stage for p in procs):
                    return None
                for p in procs:
                    assert p.stdin is not None
                    p.stdin.write(word + "\n")
                    p.stdin.flush()
            deadline = CMD_TIMEOUT + 4 * total_bytes * 8 / (self.rate_mbit * 1e6)
            outs = [p.communicate(timeout=deadline)[0].strip() for p in procs]
        except (OSError, subprocess.TimeoutExpired):
            return None
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=CMD_TIMEOUT)
        return max(float(out) for out in outs) if all(outs) else None

    def destroy(self) -> None:
        for ns in reversed(self.created):
            for _ in range(20):  # anything still inside one of our namespaces is ours: kill it before deleting
                out = _sh(f"ip netns pids {ns}", check=False).split()
                if not out:
                    break
                for pid in out:
                    with suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.25)
            _sh(f"ip netns del {ns}", check=False)

    def leftovers(self) -> list[str]:
        return [line.split()[0] for line in _sh("ip netns list").splitlines() if self.prefix in line]


@dataclass
class _Peer:
    index: int
    proc: subprocess.Popen[str]
    log: IO[str]
    started: float
    bootstrap: str | None = None
    progress: list[tuple[float, int, float | None]] = field(default_factory=list)  # (arrival time, step, eval loss)
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if line.startswith("bootstrap: ") and self.bootstrap is None:
                self.bootstrap = line.split(" ", 1)[1].strip()
            elif line.startswith('{"kind": "progress"'):
                event = json.loads(line)
                self.progress.append((time.monotonic(), int(event["step"]), event.get("eval_loss")))


def _group_members(pgids: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else []
        except OSError:
            continue
        if fields and fields[0] != "Z" and int(fields[2]) in pgids:
            found.append(int(entry.name))
    return found


@dataclass(kw_only=True, slots=True)
class WanOptions:
    config: str
    peers: int = 3
    rate_mbit: float = 100.0  # each peer's link rate, each way
    max_steps: int = 60
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None  # logs, reports and parameters; default: a new temporary directory
    timeout: float = 600.0  # stop the peers after this many seconds
    runner: str = "p2pfed"  # or "hivemind": the hivemind.Optimizer reference peer (`p2pfed bench hivemind-peer`)
    target_loss: float | None = None  # report the time until every peer's eval loss is at or below it

    def __post_init__(self) -> None:
        if not 2 <= self.peers <= 200 or self.rate_mbit <= 0 or self.max_steps < 1:
            raise UserError("need 2 <= --peers <= 200, --rate-mbit > 0 and --max-steps >= 1")
        if self.runner not in ("p2pfed", "hivemind"):
            raise UserError(f"--runner must be p2pfed or hivemind, got {self.runner!r}")
        if not Path(self.config).is_file():
            raise UserError(f"--config {self.config}: no such file")
        self.config = str(Path(self.config).resolve())


def _start(net: WanNet, i: int, args: WanOptions, run_dir: Path, bootstrap: str | None) -> _Peer:
    n = args.peers
    cmd = ["ip", "netns", "exec", net.names[i], sys.executable, "-m"]
    listen, report = f"/ip4/{net.address(i)}/tcp/0", str(run_dir / f"peer-{i}.json")
    if args.runner == "hivemind":
        cmd += ["p2pfed", "bench", "hivemind-peer", "--config", args.config, "--listen", listen, "--index", str(i)]
        cmd += ["--peers", str(n), "--max-steps", str(args.max_steps), "--report", report]
        cmd += [arg for o in args.overrides for arg in ("--set", o)]
    else:
        cmd += ["p2pfed", "peer", "--config", args.config, "--events", "jsonl", "--listen", listen]
        cmd += ["--max-steps", str(args.max_steps)]
        for o in [*args.overrides, f"swarm.min_peers={n}", f"data.num_partitions={n}", f"data.partition_index={i}"]:
            cmd += ["--set", o]
        cmd += ["--report", report, "--save-params", str(run_dir / f"peer-{i}.safetensors")]
    cmd += ["--initial-peers", bootstrap] if bootstrap else []
    log = open(run_dir / f"peer-{i}.log", "a")  # append: stderr and the stdout reader share it
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    peer = _Peer(index=i, proc=proc, log=log, started=time.monotonic())
    peer.reader = threading.Thread(target=peer.read, daemon=True)
    peer.reader.start()
    return peer


def _stop(peers: list[_Peer]) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)  # finishes its step, writes its report, stops DHT and p2pd
    deadline = time.monotonic() + GRACE_S
    for p in peers:
        with suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in peers:  # stragglers of the group (p2pd, DHT and averager processes) go with it
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(p.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=CMD_TIMEOUT)
        if p.reader is not None:
            p.reader.join(timeout=5)
        p.log.close()


def _peer_row(p: _Peer, run_dir: Path, rate_mbit: float) -> dict[str, Any]:
    path = run_dir / f"peer-{p.index}.json"
    r = json.loads(path.read_text()) if path.is_file() else {}
    row: dict[str, Any] = {"peer": p.index, "exit_code": p.proc.returncode}
    for key in ("steps", "compute_s", "wall_s", "bytes_sent", "bytes_received", "rounds_ok", "rounds_failed"):
        row[key] = r.get(key)
    row["eval_loss"] = r.get("eval_loss")
    if r.get("bytes_sent") is not None:
        row["wire_s"] = round(r["bytes_sent"] * 8 / (rate_mbit * 1e6), 3)
    if len(p.progress) >= 2 and r.get("steps"):
        (t0, s0, _), (t1, s1, _) = p.progress[0], p.progress[-1]
        row["startup_s"] = round(t0 - p.started, 3)  # launch to first progress line (first step included)
        row["train_wall_s"] = round(t1 - t0, 3)
        row["train_compute_s"] = round(r["compute_s"] * (s1 - s0) / r["steps"], 3)  # steps cost alike
    return row


def run_wan(args: WanOptions) -> dict[str, Any]:
    from p2pfed.report import max_param_divergence

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="p2pfed-wan-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    net, peers, probe_mbit = WanNet(args.peers, args.rate_mbit), [], None
    t_start = time.monotonic()

    interrupted = False
    with Interrupts() as interrupts:
        try:
            net.build()
            logger.info("namespaces %s-* on %s.0/24, %g mbit each way", net.prefix, net.subnet, args.rate_mbit)
            probe_mbit = net.probe_mbit()
            peers.append(_start(net, 0, args, run_dir, None))
            deadline = time.monotonic() + BOOTSTRAP_TIMEOUT
            while peers[0].bootstrap is None:
                if peers[0].proc.poll() is not None or time.monotonic() > deadline:
                    tail = (run_dir / "peer-0.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                    raise UserError(f"peer 0 printed no bootstrap address ({tail[0]}); see {run_dir / 'peer-0.log'}")
                time.sleep(0.1)
            peers += [_start(net, i, args, run_dir, peers[0].bootstrap) for i in range(1, args.peers)]
            deadline = t_start + args.timeout
            while any(p.proc.poll() is None for p in peers) and time.monotonic() < deadline:
                time.sleep(0.5)
            if time.monotonic() >= deadline:
                logger.warning("timeout of %.0fs reached: stopping the peers", args.timeout)
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("interrupted: stopping the peers and removing the namespaces")
        finally:
            interrupts.shield()
            _stop(peers)
            net.destroy()
            left = net.leftovers() + [str(pid) for pid in _group_members({p.proc.pid for p in peers})]
    rows = [_peer_row(p, run_dir, args.rate_mbit) for p in peers]
    util = [r["compute_s"] / r["wall_s"] for r in rows if r.get("wall_s")]
    train = [r["train_compute_s"] / r["train_wall_s"] for r in rows if r.get("train_wall_s")]
    reached = [_time_to(args.target_loss, p, t_start) for p in peers] if args.target_loss is not None else []
    times = [r for r in reached if r is not None]
    return {
        "peers": rows,
        "link_rate_mbit": args.rate_mbit,
        "tbf_burst_bytes": tbf_burst_bytes(args.rate_mbit),
        "tcp_probe_mbit": probe_mbit,
        "compute_utilization": round(sum(util) / len(util), 4) if util else None,
        "train_utilization": round(sum(train) / len(train), 4) if train else None,
        "runner": args.runner,
        "target_loss": args.target_loss,
        # every peer at or below the target: the slowest peer's time from the harness's start (None: never)
        "time_to_target_s": round(max(times), 2) if times and len(times) == len(reached) else None,
        "max_param_divergence": max_param_divergence([run_dir / f"peer-{i}.safetensors" for i in range(len(peers))]),
        "wall_s": round(time.monotonic() - t_start, 1),
        "interrupted": interrupted,
        "leftovers": left,
        "run_dir": str(run_dir),
    }


def _time_to(target: float, peer: _Peer, t_start: float) -> float | None:
    """Seconds from the harness's start to the first progress line of `peer` with eval loss <= target."""
    for arrived, _, eval_loss in peer.progress:
        if eval_loss is not None and eval_loss <= target:
            return arrived - t_start
    return None
