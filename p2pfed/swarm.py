"""`p2pfed swarm`: N peer processes on loopback, one process group each, with live progress and a combined report.

The first peer starts the swarm; the launcher reads its `bootstrap:` line and starts the others with it. Peers print
JSON lines (`--events jsonl`) that the launcher turns into a table. On exit, Ctrl+C or SIGTERM every peer gets SIGTERM
(it finishes its step and writes its report), then SIGKILL of its whole process group after a grace period, so no
DHT, averager or p2pd process outlives the swarm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from p2pfed.config import Config
from p2pfed.errors import UserError
from p2pfed.report import combine_reports

__all__ = ["LocalSwarm", "kill_group"]

_GRACE_S = 20.0


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class _PeerProc:
    index: int
    proc: subprocess.Popen[str]
    log: IO[str]
    bootstrap: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    last_event: str = "starting"
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            line = line.strip()
            if line.startswith("bootstrap: ") and self.bootstrap is None:
                self.bootstrap = line.split(" ", 1)[1]
            elif line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("kind") == "progress":
                    self.progress = event
                elif "text" in event:
                    self.last_event = event["text"]


class LocalSwarm:
    def __init__(
        self,
        *,
        n_peers: int,
        config_path: str,
        overrides: list[str],
        profiles: list[str],
        max_steps: int | None,
        run_dir: str | None,
        report_path: str | None,
        cfg: Config,
        timeout: float,
    ) -> None:
        self.n, self.config_path, self.overrides, self.profiles = n_peers, config_path, overrides, profiles
        self.max_steps, self.cfg, self.timeout = max_steps or cfg.training.max_steps, cfg, timeout
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir or f"runs/{cfg.run.id}-{stamp}")
        self.report_path = Path(report_path) if report_path else self.run_dir / "report.json"
        self.peers: list[_PeerProc] = []

    def _command(self, i: int, bootstrap: str | None) -> list[str]:
        cmd = [sys.executable, "-m", "p2pfed", "peer", "--config", self.config_path, "--events", "jsonl"]
        for o in self.overrides:
            cmd += ["--set", o]
        cmd += [
            "--set",
            f"swarm.min_peers={self.n}",
            "--set",
            f"data.num_partitions={self.n}",
            "--set",
            f"data.partition_index={i}",
        ]
        if self.cfg.checkpoint.dir:  # one directory per peer: peers never share checkpoint files
            cmd += ["--set", f"checkpoint.dir={Path(self.cfg.checkpoint.dir) / f'peer-{i}'}"]
        if self.profiles:
            cmd += ["--profile", self.profiles[i % len(self.profiles)]]
        if self.max_steps:
            cmd += ["--max-steps", str(self.max_steps)]
        if bootstrap:
            cmd += ["--initial-peers", bootstrap]
        cmd += [
            "--report",
            str(self.run_dir / f"peer-{i}.json"),
            "--save-params",
            str(self.run_dir / f"peer-{i}.safetensors"),
        ]
        return cmd

    def _start(self, i: int, bootstrap: str | None) -> _PeerProc:
        log = open(self.run_dir / f"peer-{i}.log", "a")  # append: stderr and the stdout reader share it
        proc = subprocess.Popen(
            self._command(i, bootstrap),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # own process group: killpg reaches its DHT, averager and p2pd too
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        peer = _PeerProc(index=i, proc=proc, log=log)
        peer.reader = threading.Thread(target=peer.read, daemon=True)
        peer.reader.start()
        self.peers.append(peer)
        return peer

    def _wait_bootstrap(self, first: _PeerProc, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while first.bootstrap is None:
            if first.proc.poll() is not None:
                first.log.flush()
                tail = (self.run_dir / "peer-0.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise UserError(f"the first peer exited with code {first.proc.returncode}: {tail[0]}")
            if time.monotonic() > deadline:
                raise UserError(f"the first peer printed no bootstrap address within {timeout:.0f}s")
            time.sleep(0.1)
        return first.bootstrap

    def stop_all(self) -> None:
        for p in self.peers:
            if p.proc.poll() is None:  # the peer's main process stops its DHT, averager and p2pd in order
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _GRACE_S
        for p in self.peers:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    def _reap(self) -> None:
        for p in self.peers:
            kill_group(p.proc.pid, signal.SIGKILL)  # stragglers of the group (p2pd, averager) go with it
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if p.reader is not None:
                p.reader.join(timeout=5)
            p.log.close()

    def run(self) -> int:
        from rich.console import Console
        from rich.live import Live

        console = Console(highlight=False)
        if not console.is_terminal:
            console = Console(highlight=False, width=160)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"run dir {self.run_dir}: starting {self.n} peers")
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        interrupted = False
        try:
            first = self._start(0, None)
            bootstrap = self._wait_bootstrap(first)
            console.print(f"bootstrap: {bootstrap}")
            for i in range(1, self.n):
                self._start(i, bootstrap)
            deadline = time.monotonic() + self.timeout
            if console.is_terminal:
                with Live(self._table(), console=console, refresh_per_second=2) as live:
                    while self._running(deadline, console):
                        live.update(self._table())
                    live.update(self._table())
            else:  # a log file or a pipe: a plain line every few seconds, the table once at the end
                last = 0.0
                while self._running(deadline, console):
                    if time.monotonic() - last > 5:
                        last = time.monotonic()
                        console.print(self._line())
                console.print(self._table())
        except KeyboardInterrupt:
            interrupted = True
            console.print("stopping the swarm")
        finally:
            self.stop_all()
            signal.signal(signal.SIGTERM, previous)
        report = combine_reports(
            self.cfg.run.id,
            [self.run_dir / f"peer-{i}.json" for i in range(self.n)],
            [self.run_dir / f"peer-{i}.safetensors" for i in range(self.n)],
        )
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        self.report_path.write_text(json.dumps(report, indent=2))
        console.print(self._summary(report))
        console.print(f"report: {self.report_path}")
        codes = [p.proc.returncode for p in self.peers]
        failed = [i for i, c in enumerate(codes) if c not in (0, -signal.SIGTERM)]
        if failed:
            console.print(f"peer(s) {failed} exited with codes {[codes[i] for i in failed]}; logs in {self.run_dir}")
            return 1
        return 130 if interrupted else 0

    def _running(self, deadline: float, console: Any) -> bool:
        """Sleep a moment; False once every peer has exited or the swarm's timeout is reached."""
        if all(p.proc.poll() is not None for p in self.peers):
            return False
        if time.monotonic() > deadline:
            console.print(f"timeout of {self.timeout:.0f}s reached: stopping the peers")
            return False
        time.sleep(0.5)
        return True

    def _line(self) -> str:
        parts = []
        for p in self.peers:
            g = p.progress
            if "step" not in g:  # starting up, or waiting for the swarm: no step yet
                said = "listening" if p.last_event.startswith("bootstrap:") else p.last_event[:40]
                parts.append(f"peer {p.index}: {said}")
                continue
            parts.append(f"peer {p.index}: step {g['step']} loss {g['loss']:.3f}")
        return " | ".join(parts)

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title="p2pfed swarm", title_justify="left")
        for col in ("peer", "step", "loss", "eval", "samples/s", "group", "ok", "failed", "state"):
            table.add_column(col, justify="left" if col in ("peer", "state") else "right")
        for p in self.peers:
            g = p.progress
            of = f"/{self.max_steps}" if self.max_steps else ""
            ev = g.get("eval_loss")
            state = "running" if p.proc.poll() is None else f"exit {p.proc.returncode}"
            table.add_row(
                str(p.index),
                f"{g.get('step', 0)}{of}",
                f"{g['loss']:.4f}" if "loss" in g else "-",
                f"{ev:.4f}" if ev is not None else "-",
                f"{g.get('samples_per_s', 0.0):.1f}",
                str(g.get("group_size", "-")),
                str(g.get("rounds_ok", 0)),
                str(g.get("rounds_failed", 0)),
                f"{state}: {p.last_event}"[:60],
            )
        return table

    def _summary(self, report: dict[str, Any]) -> Any:
        from rich.table import Table

        div = report["max_param_divergence"]
        title = "summary" + (f"  (max parameter divergence between peers: {div:.2e})" if div is not None else "")
        table = Table(title=title, title_justify="left")
        for col in ("peer", "steps", "loss start→end", "eval loss", "rounds ok/failed", "MB sent", "MB recv", "wall s"):
            table.add_column(col, justify="left" if col == "peer" else "right")
        for r in report["peers"]:
            loss = "-" if r["initial_loss"] is None else f"{r['initial_loss']:.3f}→{r['final_loss']:.3f}"
            table.add_row(
                r["peer_id"][-8:],
                str(r["steps"]),
                loss,
                f"{r['eval_loss']:.4f}",
                f"{r['rounds_ok']}/{r['rounds_failed']}",
                f"{r['bytes_sent'] / 1e6:.1f}",
                f"{r['bytes_received'] / 1e6:.1f}",
                f"{r['wall_s']:.1f}",
            )
        return table
