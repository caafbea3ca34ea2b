"""Reports: the per-peer JSON a peer writes, the swarm report that combines them, and the divergence check.

Swarm report: {run_id, peers: [peer report, ...], max_param_divergence}, where max_param_divergence is the largest
absolute difference of any parameter between any two peers at the end of the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["PEER_KEYS", "combine_reports", "dump_round", "max_param_divergence", "read_events"]

PEER_KEYS = (
    "peer_id",
    "steps",
    "samples",
    "initial_loss",
    "final_loss",
    "eval_loss",
    "rounds_ok",
    "rounds_failed",
    "bytes_sent",
    "bytes_received",
    "param_l2",
)


def max_param_divergence(param_files: Sequence[str | Path]) -> float | None:
    """Largest |a - b| over every parameter element and every pair of peers; None with fewer than two files."""
    files = [Path(p) for p in param_files if Path(p).is_file()]
    if len(files) < 2:
        return None
    states = [load_file(str(p)) for p in files]
    names = set(states[0])
    for s in states[1:]:
        if set(s) != names:
            raise ValueError("peers saved different parameter sets; they are not training the same model")
    worst = 0.0
    for name in sorted(names):
        stacked = torch.stack([s[name].double() for s in states])  # (peers, *shape)
        worst = max(worst, float((stacked.amax(0) - stacked.amin(0)).max()))
    return worst


def combine_reports(
    run_id: str, report_files: Sequence[str | Path], param_files: Sequence[str | Path]
) -> dict[str, Any]:
    peers = []
    for path in report_files:
        p = Path(path)
        if p.is_file():
            peers.append(json.loads(p.read_text()))
    return {"run_id": run_id, "peers": peers, "max_param_divergence": max_param_divergence(param_files)}


def dump_round(
    out_dir: str | Path | None, peer_id: str, step: int, weight: int, local: torch.Tensor, averaged: torch.Tensor
) -> None:
    """Test aid (--dump-grads): a round's local and averaged gradient and the peer's weight, as safetensors."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"local": local, "averaged": averaged.clone(), "weight": torch.tensor([float(weight)])},
        str(out / f"{peer_id}-step{step}.safetensors"),
    )


def read_events(log: str | Path) -> list[dict[str, Any]]:
    """The JSON-lines events (`--events jsonl`) in a peer's log, in order; other lines (stderr, a line cut short by a
    kill) are skipped."""
    events = []
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
