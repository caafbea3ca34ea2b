"""`p2pfed report RUN_DIR`: plots and a markdown summary of a finished (or running) run, with its egress cost.

    paths = write_run_report(Path("runs/demo-20261202"), out=None, cost=cfg.cost)

A run directory holds, per peer, its report (`NAME.json`, from `--report`) and its JSON-lines log (`NAME.log` or
`NAME.jsonl`, from `--events jsonl`; `p2pfed swarm` writes both as peer-I.json and peer-I.log). A log pairs with the
report of the same name, or else with the report whose peer id its `done` line carries. Peers of several sites can be
put together by copying their files into one directory.

Written to RUN_DIR/report/ (or --out): eval_loss_vs_time.png, eval_loss_vs_tokens.png, bytes_by_cloud_pair.png and
summary.md. Byte totals and costs come from the peer reports (what each peer counted on its sockets); the plots of
bytes per round come from the progress lines' running totals.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfed.config import CostConfig
from p2pfed.cost import bytes_by_pair, egress_usd, price_per_gb, sync_fp32_bytes_by_pair
from p2pfed.errors import UserError
from p2pfed.report import read_events

__all__ = ["PeerRun", "load_run", "write_run_report"]

logger = logging.getLogger(__name__)


@dataclass
class PeerRun:
    name: str
    report: dict[str, Any]
    progress: list[dict[str, Any]] = field(default_factory=list)  # the log's progress lines, in order

    @property
    def label(self) -> str:
        return f"{self.name} ({self.report.get('cloud', '?')})"


def load_run(run_dir: Path) -> list[PeerRun]:
    """The peers of a run directory: every peer report in it, each with the progress lines of its log."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    peers: dict[str, PeerRun] = {}
    for path in sorted(run_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "peer_id" in data and "steps" in data:
            peers[path.stem] = PeerRun(path.stem, data)
    if not peers:
        raise UserError(f"{str(run_dir)!r} holds no peer report (NAME.json written by `p2pfed peer --report`)")
    by_id = {p.report["peer_id"]: p for p in peers.values()}
    for path in sorted([*run_dir.glob("*.log"), *run_dir.glob("*.jsonl")]):
        events = read_events(path)
        owner = peers.get(path.stem)
        if owner is None:
            done = [e for e in events if e.get("kind") == "done" and e.get("peer_id") in by_id]
            owner = by_id[done[-1]["peer_id"]] if done else None
        if owner is None:
            logger.warning("%s: no peer report of the same name or peer id; left out", path.name)
            continue
        owner.progress = [e for e in events if e.get("kind") == "progress"]
    return sorted(peers.values(), key=lambda p: p.name)


def _gb(n: float) -> str:
    return f"{n / 1e9:.4f}" if n < 1e11 else f"{n / 1e9:,.0f}"


def _summary(run_dir: Path, peers: Sequence[PeerRun], cost: CostConfig, images: Sequence[str]) -> str:
    reports = [p.report for p in peers]
    pairs, base = bytes_by_pair(reports), sync_fp32_bytes_by_pair(reports)
    usd, base_usd = egress_usd(pairs, cost), egress_usd(base, cost)
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"{len(peers)} peers; clouds: {', '.join(sorted({str(r.get('cloud', '?')) for r in reports}))}.",
        "",
        "## Peers",
        "",
        "| peer | cloud | steps | samples | eval loss (start -> end) | compute s | wall s | bytes sent "
        "| bytes received |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in peers:
        r = p.report
        start = r.get("initial_eval_loss")
        loss = (
            f"{start:.4f} -> {r['eval_loss']:.4f}" if start is not None else f"{r.get('eval_loss', float('nan')):.4f}"
        )
        lines.append(
            f"| {p.name} | {r.get('cloud', '?')} | {r['steps']} | {r.get('samples', 0)} | {loss} | "
            f"{r.get('compute_s', 0):.1f} | {r.get('wall_s', 0):.1f} | {r.get('bytes_sent', 0)} | "
            f"{r.get('bytes_received', 0)} |"
        )
    lines += [
        "",
        "## Egress by cloud pair",
        "",
        "Bytes each peer sent while averaging, by its cloud and the receiver's, priced at the sender's egress rate "
        "(`cost` in the config). Baseline: the same peers and steps with synchronous fp32 gradient all-reduce after "
        "every step (2 x 4 bytes x parameters / peers to each other peer per step).",
        "",
        "| from | to | $/GB | bytes | GB | cost $ | sync fp32 bytes | sync fp32 cost $ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in sorted(set(pairs) | set(base)):
        lines.append(
            f"| {pair[0]} | {pair[1]} | {price_per_gb(pair[0], pair[1], cost):.3f} | {pairs.get(pair, 0)} | "
            f"{_gb(pairs.get(pair, 0))} | {usd.get(pair, 0.0):.4f} | {base.get(pair, 0)} | "
            f"{base_usd.get(pair, 0.0):.4f} |"
        )
    total, total_base = sum(pairs.values()), sum(base.values())
    lines += [
        f"| **total** | | | **{total}** | {_gb(total)} | **{sum(usd.values()):.4f}** | {total_base} | "
        f"{sum(base_usd.values()):.4f} |",
        "",
        f"Bytes sent, all peers: {total}; the sync fp32 baseline would have sent {total_base / total:.2f}x as many."
        if total
        else "No bytes were sent (a single peer, or no committed rounds).",
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in images],
        "",
    ]
    return "\n".join(lines)


def _evaluations(progress: Sequence[dict[str, Any]], xkey: str) -> list[tuple[float, float]]:
    """(x, eval loss) at each new evaluation: a progress line repeats the last eval loss until the next one."""
    points: list[tuple[float, float]] = []
    last = None
    for e in progress:
        loss = e.get("eval_loss")
        if loss is not None and xkey in e and loss != last:
            points.append((float(e[xkey]), float(loss)))
            last = loss
    return points


def _plot(peers: Sequence[PeerRun], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    t0 = min((p.progress[0]["time"] for p in peers if p.progress and "time" in p.progress[0]), default=0.0)
    written = []
    for name, xkey, xlabel in (
        ("eval_loss_vs_time.png", "time", "seconds since the run's first step"),
        ("eval_loss_vs_tokens.png", "tokens", "tokens this peer trained on"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for p in peers:
            points = _evaluations(p.progress, xkey)
            if points:
                xs = [x - t0 if xkey == "time" else x for x, _ in points]
                ax.plot(xs, [y for _, y in points], marker=".", label=p.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    # bytes per round by cloud pair: differences of each peer's running totals, summed over the sender's cloud
    per_round: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for p in peers:
        before: dict[str, int] = {}
        for e in p.progress:
            for dest, total in (e.get("bytes_by_cloud") or {}).items():
                delta = int(total) - before.get(dest, 0)
                before[dest] = int(total)
                if delta > 0:
                    per_round[(str(p.report.get("cloud", "?")), dest)][int(e["step"])] += delta
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--", ":", "-."]  # pairs that send the same bytes draw over each other: tell them apart
    for i, ((src, dest), steps) in enumerate(sorted(per_round.items())):
        rounds = sorted(steps)
        style = styles[i % len(styles)]
        ax.plot(rounds, [steps[r] / 1e6 for r in rounds], marker=".", linestyle=style, label=f"{src} -> {dest}")
    ax.set_xlabel("step")
    ax.set_ylabel("MB sent in the round ending at this step")
    ax.grid(alpha=0.3)
    if per_round:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no averaging traffic recorded", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "bytes_by_cloud_pair.png", dpi=100)
    plt.close(fig)
    written.append("bytes_by_cloud_pair.png")
    return written


def write_run_report(run_dir: Path, *, out: Path | None = None, cost: CostConfig | None = None) -> list[Path]:
    """Write the plots and summary.md for `run_dir`; returns the files written."""
    peers = load_run(run_dir)
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = _plot(peers, out)
    summary = out / "summary.md"
    summary.write_text(_summary(run_dir, peers, cost or CostConfig(), images))
    return [*(out / name for name in images), summary]
