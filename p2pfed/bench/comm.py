"""Bytes on the wire per trained token: a communication-efficient run against synchronous fp32 averaging.

    p2pfed bench comm [--config configs/tiny-lowcomm.yaml] [--peers 3] [--max-steps 200] [--set k=v ...] [--json]

Two local swarms (`p2pfed swarm`, peers on loopback) train the same model on the same data with the same peers for
the same number of steps, so the same tokens:

- baseline: the config with `averaging.mode=sync` and `compression.name=none`, i.e. every step all-reduces the fp32
  gradient;
- ours: the config as given (with `--set` overrides), by default DiLoCo with compressed pseudo-gradients.

Per side: bytes_per_token = mean over peers of (bytes sent on the averaging wire) / (tokens the peer trained on).
`reduction` = baseline / ours; eval losses are the peers' mean final eval loss on the shared validation set.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p2pfed.bench.hetero import run_swarm
from p2pfed.config import load_config

__all__ = ["run_comm"]

BASELINE = ["averaging.mode=sync", "compression.name=none"]


def _side(name: str, *, say: Callable[[str], None], **swarm: Any) -> dict[str, Any]:
    """One swarm (run_swarm's keyword arguments) and its bytes per token and eval loss."""
    t0 = time.perf_counter()
    report = run_swarm(name, say=say, **swarm)
    rows = report["peers"]
    seq_len = load_config(swarm["config"], list(swarm["overrides"])).model.seq_len
    per_token = [r["bytes_sent"] / max(1, r["samples"] * seq_len) for r in rows]
    side = {
        "bytes_per_token": statistics.mean(per_token),
        "eval_loss": statistics.mean(r["eval_loss"] for r in rows),
        "tokens_per_peer": statistics.mean(r["samples"] * seq_len for r in rows),
        "rounds_ok": statistics.mean(r["rounds_ok"] for r in rows),
        "wall_s": round(time.perf_counter() - t0, 1),
        "max_param_divergence": report["max_param_divergence"],
    }
    say(f"{name}: {side['bytes_per_token']:.1f} bytes/token, eval loss {side['eval_loss']:.4f}, {side['wall_s']} s")
    return side


def run_comm(
    *,
    config: str,
    overrides: Sequence[str],
    peers: int,
    max_steps: int,
    run_dir: str | None,
    timeout: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Run the baseline and our side, one after the other, and return their figures and ratios."""
    load_config(config, list(overrides))  # a bad config is a one-line error before any peer starts
    root = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="p2pfed-comm-"))
    root.mkdir(parents=True, exist_ok=True)
    common = {"config": config, "peers": peers, "max_steps": max_steps, "run_dir": root, "timeout": timeout}
    base = _side("baseline", overrides=[*overrides, *BASELINE], say=say, **common)
    ours = _side("ours", overrides=list(overrides), say=say, **common)
    return {
        "bytes_per_token": ours["bytes_per_token"],
        "baseline_bytes_per_token": base["bytes_per_token"],
        "reduction": base["bytes_per_token"] / max(ours["bytes_per_token"], 1e-12),
        "eval_loss": ours["eval_loss"],
        "baseline_eval_loss": base["eval_loss"],
        "eval_loss_ratio": ours["eval_loss"] / base["eval_loss"],
        "ours": ours,
        "baseline": base,
        "peers": peers,
        "max_steps": max_steps,
        "config": config,
        "overrides": list(overrides),
        "run_dir": str(root),
    }
