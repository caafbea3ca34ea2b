"""`p2pfed status`: join the DHT as a client (no listening socket) and list the live peers of each run."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from p2pfed.actors.discovery import BOOTSTRAP_RETRY_S, read_peers, runs_key, start_dht
from p2pfed.admission import SealedRecords, read_swarm_key
from p2pfed.errors import UserError

__all__ = ["StatusReader", "add_rates", "render_status", "status_table"]


class StatusReader:
    """A DHT client (no listening socket) that reads the live peers of each run, as often as asked."""

    def __init__(self, initial_peers: list[str], *, timeout: float, swarm_key: str | None = None) -> None:
        validator = SealedRecords(read_swarm_key(swarm_key)) if swarm_key is not None else None
        self.timeout = timeout
        self.dht = start_dht(
            initial_peers=initial_peers, listen="/ip4/127.0.0.1/tcp/0", client_mode=True, startup_timeout=timeout,
            record_validators=[validator] if validator is not None else [], retry_s=min(timeout, BOOTSTRAP_RETRY_S),
        )  # fmt: skip

    def __enter__(self) -> StatusReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dht.shutdown()

    def read(self, run_id: str | None, *, patience: float = 0.0) -> list[dict[str, Any]]:
        """[{run_id, info, peers: [peer record, ...]}] of every run (or only `run_id`). A client that has just joined
        may not reach the nodes holding the key on its first lookup: it retries for up to `patience` seconds."""
        deadline = time.monotonic() + patience
        while True:
            found = self.dht.get(runs_key(), latest=True, return_future=True).result(timeout=self.timeout)
            run_ids = sorted(found.value) if found is not None and isinstance(found.value, dict) else []
            if run_ids or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if run_id is not None:
            if run_id not in run_ids:
                known = ", ".join(run_ids) or "none"
                raise UserError(f"no live peers of run {run_id!r} in this swarm (runs seen: {known})")
            run_ids = [run_id]
        runs = []
        for rid in run_ids:
            info = getattr(found.value[rid], "value", {}) if found is not None else {}
            peers = [dataclasses.asdict(p) for p in read_peers(self.dht, rid, timeout=self.timeout)]
            runs.append({"run_id": rid, "info": info, "peers": sorted(peers, key=lambda p: (p["cloud"], p["peer_id"]))})
        return runs


def add_rates(runs: list[dict[str, Any]], before: dict[str, tuple[float, int, float | None]]) -> None:
    """Set each peer's bytes_per_s: the change of its bytes_sent between two of its announcements, over their time
    difference (`before`: the last announcement seen per peer, updated in place). A record read again before the
    peer announces anew keeps the rate it had; a peer seen once has none yet."""
    for run in runs:
        for p in run["peers"]:
            key = f"{run['run_id']}/{p['peer_id']}"
            stamp, sent = float(p.get("announced_at", 0.0)), int(p.get("bytes_sent", 0))
            previous = before.get(key)
            rate = None
            if previous is not None:
                rate = previous[2] if stamp <= previous[0] else max(0.0, (sent - previous[1]) / (stamp - previous[0]))
            if previous is None or stamp > previous[0]:
                before[key] = (stamp, sent, rate)
            p["bytes_per_s"] = rate


def status_table(runs: list[dict[str, Any]]) -> Any:
    """One rich table of every run's live peers, grouped by cloud."""
    from rich.console import Group
    from rich.table import Table

    if not runs:
        return "no live runs found (a swarm with a key shows only with --swarm-key)"
    tables = []
    for run in runs:
        table = Table(title=f"run {run['run_id']}", title_justify="left")
        private = any(p.get("epsilon") is not None for p in run["peers"])
        rates = any("bytes_per_s" in p for p in run["peers"])
        columns = ("cloud", "peer", "device", "step", "loss", "samples/s", *(["bytes/s"] if rates else []),
                   *(["epsilon"] if private else []), "state")  # fmt: skip
        for col in columns:
            right = col in ("step", "loss", "samples/s", "bytes/s", "epsilon")
            table.add_column(col, justify="right" if right else "left")
        previous_cloud = None
        for p in run["peers"]:
            if previous_cloud is not None and p["cloud"] != previous_cloud:
                table.add_section()
            previous_cloud = p["cloud"]
            loss = f"{p['loss']:.4f}" if p["loss"] is not None else "-"
            rate = p.get("bytes_per_s")
            table.add_row(
                p["cloud"],
                p["peer_id"][-8:],  # as the peers' own log prefixes show it; --json has the whole id
                p["device"],
                str(p["step"]),
                loss,
                f"{p['samples_per_s']:.1f}",
                *([_human_rate(rate)] if rates else []),
                *([f"{p['epsilon']:.3f}" if p.get("epsilon") is not None else "-"] if private else []),
                "finished" if p["finished"] else ("training" if p.get("ready") else "joining"),
            )
        tables.append(table)
    return Group(*tables)


def _human_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= size:
            return f"{rate / size:.1f} {unit}"
    return f"{rate:.0f} B/s"


def render_status(runs: list[dict[str, Any]]) -> None:
    from rich.console import Console

    Console().print(status_table(runs))
