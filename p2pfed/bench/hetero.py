"""Heterogeneous peers: how long fast peers wait for a slow one, with fixed equal batches and with adaptive sizing.

    p2pfed bench hetero [--config configs/tiny.yaml] [--slowdowns 1,1,3] [--global-batch 96] [--max-steps 150]
                        [--target-loss 2.3] [--set k=v ...] [--json]

Two local swarms (`p2pfed swarm`, one peer per slowdown, each from peers/local-cpu.yaml with that `slowdown`: the
peer sleeps (slowdown - 1) times its real compute time, emulating slower hardware honestly) train the same model on
the same data for the same steps with the same global batch per step:

- fixed: every peer computes global / peers samples a step (`training.batch_size`), as hivemind's per-peer batch
  size set by hand would have it;
- adaptive: `training.global_batch_size`: each peer's share follows its measured samples/s (p2pfed/batching.py),
  in samples or, with `--set training.share_by=time`, in seconds of compute.

Per side: `waiting_fraction` of the fastest peers = their time spent waiting for other members to arrive at rounds
(the `waiting_s` of their progress lines) over their training time, both from the first to the last progress line
(the swarm's formation, when peers arrive seconds apart, is start-up, not waiting), and `time_to_target_s`, from the
swarm's first progress line until every peer has reported an eval loss at or below the target. The ratio is
adaptive / fixed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from p2pfed.config import load_config, load_profile
from p2pfed.errors import UserError
from p2pfed.report import read_events

__all__ = ["progress_events", "run_hetero", "run_swarm"]

_BASE_PROFILE = Path(__file__).resolve().parents[2] / "peers" / "local-cpu.yaml"


def run_swarm(
    name: str,
    *,
    config: str,
    overrides: Sequence[str],
    peers: int,
    max_steps: int,
    run_dir: Path,
    timeout: float,
    say: Callable[[str], None],
    profiles: Sequence[str] = (),
) -> dict[str, Any]:
    """Run one local swarm (`p2pfed swarm`) into run_dir/name; its combined report, the peers' in index order."""
    cmd = [sys.executable, "-m", "p2pfed", "swarm", "--peers", str(peers), "--config", config]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    cmd += [arg for p in profiles for arg in ("--profile", p)]
    report_path = run_dir / name / "report.json"
    cmd += ["--max-steps", str(max_steps), "--run-dir", str(run_dir / name), "--report", str(report_path)]
    cmd += ["--timeout", str(timeout)]
    say(f"{name}: {peers} peers, {max_steps} steps, overrides {list(overrides) or 'none'}")
    with open(run_dir / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0 or not report_path.exists():
        raise UserError(f"the {name} swarm exited with code {code}; see {run_dir / name}")
    report = json.loads(report_path.read_text())
    if len(report["peers"]) != peers:
        raise UserError(f"the {name} swarm reported {len(report['peers'])} of {peers} peers; see {run_dir / name}")
    return report


def progress_events(log: Path) -> list[dict[str, Any]]:
    """The progress events (with their `time`) a peer printed, from its swarm log."""
    return [e for e in read_events(log) if e.get("kind") == "progress"]


def _side(name: str, *, slowdowns: Sequence[float], target_loss: float | None, **kwargs: Any) -> dict[str, Any]:
    report = run_swarm(name, **kwargs)
    run_dir: Path = kwargs["run_dir"] / name
    events = [progress_events(run_dir / f"peer-{i}.log") for i in range(len(slowdowns))]
    start = min(e[0]["time"] for e in events if e)
    fastest = min(slowdowns)
    fractions = []
    for i, evs in enumerate(events):
        if slowdowns[i] == fastest and len(evs) > 1:  # from its first progress line on: start-up is not waiting
            fractions.append((evs[-1]["waiting_s"] - evs[0]["waiting_s"]) / max(evs[-1]["time"] - evs[0]["time"], 1e-9))
    reached = []
    for evs in events:
        hit = [e["time"] for e in evs if target_loss is not None and (e.get("eval_loss") or 1e9) <= target_loss]
        reached.append(hit[0] - start if hit else None)
    side = {
        "waiting_fraction": statistics.mean(fractions) if fractions else None,
        "time_to_target_s": max(reached) if reached and None not in reached else None,  # type: ignore[type-var]
        "eval_loss": statistics.mean(p["eval_loss"] for p in report["peers"]),
        "samples_per_round": [p["samples_per_round"] for p in report["peers"]],
        "waiting_s": [p["waiting_s"] for p in report["peers"]],
        "train_s": round(max(e[-1]["time"] for e in events if e) - start, 2),
    }
    kwargs["say"](f"{name}: waiting fraction {side['waiting_fraction']}, time to target {side['time_to_target_s']}")
    return side


def run_hetero(
    *,
    config: str,
    overrides: Sequence[str],
    slowdowns: Sequence[float],
    global_batch: int,
    max_steps: int,
    target_loss: float | None,
    run_dir: str | None,
    timeout: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    n = len(slowdowns)
    if global_batch < n:
        raise UserError(f"--global-batch must give every peer a sample, got {global_batch} for {n} peers")
    adaptive_batches = [f"training.global_batch_size={global_batch}"]
    load_config(config, [*overrides, *adaptive_batches])  # a bad config is a one-line error before any peer starts
    root = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="p2pfed-hetero-"))
    root.mkdir(parents=True, exist_ok=True)
    profiles = []
    for i, slowdown in enumerate(slowdowns):
        profile = load_profile(_BASE_PROFILE, [f"slowdown={slowdown}", f"name=bench-{i}"])
        path = root / f"profile-{i}.yaml"
        path.write_text(yaml.safe_dump(profile.model_dump()))
        profiles.append(str(path))
    common: dict[str, Any] = {
        "config": config, "peers": n, "max_steps": max_steps, "run_dir": root, "timeout": timeout, "say": say,
        "profiles": profiles, "slowdowns": slowdowns, "target_loss": target_loss,
    }  # fmt: skip
    t0 = time.perf_counter()
    fixed_batches = [f"training.batch_size={global_batch // n}", "training.share_by=samples"]
    fixed = _side("fixed", overrides=[*overrides, *fixed_batches], **common)
    adaptive = _side("adaptive", overrides=[*overrides, *adaptive_batches], **common)
    ratio = None
    if fixed["time_to_target_s"] and adaptive["time_to_target_s"]:
        ratio = adaptive["time_to_target_s"] / fixed["time_to_target_s"]
    return {
        "waiting_fraction": adaptive["waiting_fraction"],
        "fixed_waiting_fraction": fixed["waiting_fraction"],
        "time_to_target_s": adaptive["time_to_target_s"],
        "fixed_time_to_target_s": fixed["time_to_target_s"],
        "time_ratio": ratio,
        "adaptive": adaptive,
        "fixed": fixed,
        "slowdowns": list(slowdowns),
        "global_batch": global_batch,
        "max_steps": max_steps,
        "target_loss": target_loss,
        "wall_s": round(time.perf_counter() - t0, 1),
        "run_dir": str(root),
    }
