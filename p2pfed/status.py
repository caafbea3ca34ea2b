"""`p2pfed status`: join the DHT as a client (no listening socket) and list the live peers of each run."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from p2pfed.actors.discovery import BOOTSTRAP_RETRY_S, read_peers, runs_key, start_dht
from p2pfed.admission import SealedRecords, read_swarm_key
from p2pfed.errors import UserError

__all__ = ["collect_status", "render_status"]


def collect_status(
    initial_peers: list[str], *, run_id: str | None, timeout: float, swarm_key: str | None = None
) -> list[dict[str, Any]]:
    validator = SealedRecords(read_swarm_key(swarm_key)) if swarm_key is not None else None
    dht = start_dht(
        initial_peers=initial_peers, listen="/ip4/127.0.0.1/tcp/0", client_mode=True, startup_timeout=timeout,
        record_validators=[validator] if validator is not None else [], retry_s=min(timeout, BOOTSTRAP_RETRY_S),
    )  # fmt: skip
    try:
        # A client that has just joined may not reach the nodes holding the key on its first lookup: retry briefly.
        deadline = time.monotonic() + min(timeout, 10.0)
        while True:
            found = dht.get(runs_key(), latest=True, return_future=True).result(timeout=timeout)
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
            peers = [dataclasses.asdict(p) for p in read_peers(dht, rid, timeout=timeout)]
            runs.append({"run_id": rid, "info": info, "peers": peers})
        return runs
    finally:
        dht.shutdown()


def render_status(runs: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not runs:
        console.print("no live runs found (a swarm with a key shows only with --swarm-key)")
        return
    for run in runs:
        table = Table(title=f"run {run['run_id']}", title_justify="left")
        private = any(p.get("epsilon") is not None for p in run["peers"])
        columns = ("peer", "cloud", "device", "step", "loss", "samples/s", *(["epsilon"] if private else []), "state")
        for col in columns:
            table.add_column(col, justify="right" if col in ("step", "loss", "samples/s", "epsilon") else "left")
        for p in run["peers"]:
            loss = f"{p['loss']:.4f}" if p["loss"] is not None else "-"
            table.add_row(
                p["peer_id"],
                p["cloud"],
                p["device"],
                str(p["step"]),
                loss,
                f"{p['samples_per_s']:.1f}",
                *([f"{p['epsilon']:.3f}" if p.get("epsilon") is not None else "-"] if private else []),
                "finished" if p["finished"] else "training",
            )
        console.print(table)
