"""The `p2pfed` command line.

    p2pfed peer --config configs/tiny.yaml                      # start a new swarm; prints its bootstrap address
    p2pfed peer --config configs/tiny.yaml --initial-peers MADDR  # join it
    p2pfed swarm --peers 3 --config configs/tiny.yaml --max-steps 50
    p2pfed status --initial-peers MADDR
    p2pfed bench allreduce --peers 3 --numel 25000000

User mistakes print one line and exit 2; a peer that stops on a signal exits 0 after writing its report.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from p2pfed.errors import UserError

# compression.name's choices (p2pfed.config), repeated here so that `p2pfed --help` does not import torch
COMPRESSION_NAMES = ("none", "fp16", "uint8", "randomk", "topk", "powersgd")

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USER_ERROR)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError into one line on stderr and exit 2; Ctrl+C into exit 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="p2pfed")
def main() -> None:
    """Train one language model across sites, peer to peer, with no central server."""


_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), required=True, help="run config YAML (configs/)"
)
_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value by dotted path (repeatable)"
)


def _human_sink(every_s: float = 2.0) -> Callable[[str, dict[str, Any]], None]:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    last = [0.0]

    def sink(kind: str, data: dict[str, Any]) -> None:
        if kind == "bootstrap":
            click.echo(data["text"], nl=True)  # plain stdout line: scripts parse it
            sys.stdout.flush()
        elif kind == "progress":
            now = time.monotonic()
            done = data["max_steps"] is not None and data["step"] >= data["max_steps"]
            if now - last[0] < every_s and not done:
                return
            last[0] = now
            of = f"/{data['max_steps']}" if data["max_steps"] else ""
            ev = f"{data['eval_loss']:.4f}" if data["eval_loss"] is not None else "-"
            console.print(
                f"step {data['step']}{of}  loss {data['loss']:.4f}  eval {ev}  "
                f"{data['samples_per_s']:.1f} samples/s  group {data['group_size']}  "
                f"rounds ok {data['rounds_ok']} failed {data['rounds_failed']}"
                + (f"  epsilon {data['epsilon']:.3f}" if data.get("epsilon") is not None else "")
            )
        elif kind != "done":
            console.print(data["text"])

    return sink


def _with_suffix(path: str, suffix: str) -> str:
    """peer.safetensors -> peer.rank1.safetensors"""
    p = Path(path)
    return str(p.with_name(p.stem + suffix + p.suffix))


def _jsonl_sink(kind: str, data: dict[str, Any]) -> None:
    if kind == "bootstrap":
        click.echo(data["text"])
    click.echo(json.dumps({"kind": kind, **data, "time": round(time.time(), 3)}, default=str))
    sys.stdout.flush()


@main.command()
@_config_option
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), help="peer profile YAML (peers/)")
@_set_option
@click.option("--initial-peers", multiple=True, metavar="MADDR", help="join the swarm through this peer (repeatable)")
@click.option("--listen", metavar="MADDR", help="multiaddr to listen on (default: swarm.listen)")
@click.option("--identity", "identity_path", type=click.Path(dir_okay=False), help="libp2p private key file")
@click.option("--max-steps", type=click.IntRange(min=1), help="stop at this global step")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the peer report (JSON) here")
@click.option("--save-params", type=click.Path(dir_okay=False), help="write final parameters (safetensors) here")
@click.option("--events", type=click.Choice(["human", "jsonl"]), default="human", help="progress format on stdout")
@click.option("--resume", type=click.Path(file_okay=False), help="continue from the newest checkpoint in DIR")
@click.option(
    "--announce",
    multiple=True,
    metavar="MADDR",
    help="address other peers should dial, e.g. this site's public IP behind NAT (repeatable)",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="serve Prometheus metrics on this port (0: any free port; the peer prints the address)",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="address the metrics endpoint binds")
@click.option("--dump-grads", type=click.Path(file_okay=False), hidden=True, help="test aid: save round gradients")
@click.option("--perturb-at", type=int, hidden=True, help="test aid: corrupt parameters after this step")
@click.option("--fault-update", type=click.Choice(["nan", "inf", "huge", "mixed"]), hidden=True,
              help="test aid: send NaN, inf or 1e30 values in this peer's updates (mixed: each in turn)")  # fmt: skip
@click.option("--die-in-round", type=int, hidden=True,
              help="test aid: SIGKILL this peer's process group in its Nth round's all-reduce, once the "
                   "first averaged piece is back, its own slice's means held back")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="debug logs, hivemind's included")
@user_errors
def peer(
    config_path: str,
    profile_path: str | None,
    overrides: tuple[str, ...],
    initial_peers: tuple[str, ...],
    listen: str | None,
    identity_path: str | None,
    max_steps: int | None,
    report_path: str | None,
    save_params: str | None,
    events: str,
    resume: str | None,
    announce: tuple[str, ...],
    metrics_port: int | None,
    metrics_host: str,
    dump_grads: str | None,
    perturb_at: int | None,
    fault_update: str | None,
    die_in_round: int | None,
    verbose: bool,
) -> None:
    """Start one peer: join (or start) a swarm and train until --max-steps or Ctrl+C."""
    from p2pfed.config import check_initial_peers, load_config, load_profile

    if listen:
        overrides = (*overrides, f"swarm.listen={listen}")
    if max_steps is not None:  # the run's last step, for the learning-rate schedule too (and every torchrun rank)
        overrides = (*overrides, f"training.max_steps={max_steps}")
    cfg = load_config(config_path, overrides)
    profile = load_profile(profile_path)
    if cfg.training.lr_schedule != "constant" and cfg.training.max_steps is None:
        raise UserError(
            f"training.lr_schedule {cfg.training.lr_schedule} decays to the run's last step: "
            "set training.max_steps or pass --max-steps"
        )
    check_initial_peers(initial_peers)  # before the slow imports: a typo costs a second, not ten
    if profile.relay and not initial_peers:
        raise UserError("profile relay: true needs --initial-peers (the bootstrap peers are this peer's relays)")
    for maddr in announce:
        if not maddr.startswith("/") or maddr.rstrip("/").endswith("/tcp/0") or "/tcp/" not in maddr:
            raise UserError(
                f"--announce {maddr!r} is not a multiaddr with an explicit TCP port, e.g. /ip4/IP/tcp/31337"
            )
    if resume is not None:
        from pathlib import Path

        from p2pfed.checkpoint import check_resume_dir

        check_resume_dir(Path(resume))

    import asyncio

    from p2pfed.log import PeerContext, setup_logging
    from p2pfed.peer import Peer, PeerOptions
    from p2pfed.ranks import RankGroup, run_follower

    ranks = RankGroup.from_env(profile.device)  # torchrun: this process is one rank of a peer
    if ranks is not None and cfg.privacy.dp:
        raise UserError("privacy.dp does not work with a torchrun peer yet (each rank's noise would be averaged away)")
    ctx = PeerContext()
    setup_logging(ctx, verbose=verbose)
    if ranks is not None and not ranks.leader:
        import signal

        ctx.peer = f"rank{ranks.rank}"
        for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 stops the ranks once it has finished its step
            signal.signal(sig, signal.SIG_IGN)
        suffix = f".rank{ranks.rank}"
        run_follower(cfg, profile, ranks, save_params=_with_suffix(save_params, suffix) if save_params else None)
        return
    options = PeerOptions(
        initial_peers=list(initial_peers),
        identity_path=identity_path,
        report_path=report_path,
        save_params=save_params,
        dump_grads=dump_grads,
        perturb_at=perturb_at,
        fault_update=fault_update,
        die_in_round=die_in_round,
        resume=resume,
        announce=list(announce),
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        ranks=ranks,
        sink=_jsonl_sink if events == "jsonl" else _human_sink(),
        context=ctx,
    )
    asyncio.run(Peer(cfg, profile, options).run())


@main.command()
@click.option("--peers", "n_peers", type=click.IntRange(min=1, max=64), required=True, help="number of local peers")
@_config_option
@_set_option
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), help="peer profiles, in turn")
@click.option("--max-steps", type=click.IntRange(min=1), help="stop at this global step")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="combined report (JSON)")
@click.option("--run-dir", type=click.Path(file_okay=False), help="logs, reports, params (default runs/RUN-TIME)")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True, help="stop after seconds")
@user_errors
def swarm(
    n_peers: int,
    config_path: str,
    overrides: tuple[str, ...],
    profiles: tuple[str, ...],
    max_steps: int | None,
    report_path: str | None,
    run_dir: str | None,
    timeout: float,
) -> None:
    """Run N peer processes on loopback, show progress, and combine their reports."""
    from p2pfed.config import load_config, load_profile
    from p2pfed.swarm import LocalSwarm

    cfg = load_config(config_path, overrides)  # validate once here, so a bad key fails before any peer starts
    for p in profiles:
        load_profile(p)
    result = LocalSwarm(
        n_peers=n_peers,
        config_path=config_path,
        overrides=list(overrides),
        profiles=list(profiles),
        max_steps=max_steps,
        run_dir=run_dir,
        report_path=report_path,
        cfg=cfg,
        timeout=timeout,
    ).run()
    sys.exit(result)


@main.command()
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="swarm key file to create")
@click.option("--identity", "identity_path", type=click.Path(dir_okay=False), default=None,
              help="also create a libp2p peer identity here (for `p2pfed peer --identity`)")  # fmt: skip
@user_errors
def keygen(out_path: str, identity_path: str | None) -> None:
    """Create a swarm key (privacy.swarm_key): only peers holding it may join this swarm's averaging."""
    from p2pfed.admission import write_swarm_key

    if identity_path is not None and Path(identity_path).exists():
        raise UserError(f"{identity_path!r} already exists: refusing to overwrite a peer identity")
    write_swarm_key(out_path)
    click.echo(f"swarm key written to {out_path} (mode 0600): give it to every peer, set privacy.swarm_key")
    if identity_path is not None:
        from hivemind.p2p import P2P, PeerID

        P2P.generate_identity(identity_path)
        Path(identity_path).chmod(0o600)
        peer_id = PeerID.from_identity(Path(identity_path).read_bytes()).to_base58()
        click.echo(f"peer identity written to {identity_path}; its peer id: {peer_id}")


@main.command()
@click.option("--initial-peers", multiple=True, required=True, metavar="MADDR", help="any live peer of the swarm")
@click.option("--run", "run_id", help="only this run (default: every run found)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table (with --watch: one line per read)")
@click.option("--watch", is_flag=True, help="keep reading: a live table (bytes/s between a peer's announcements)")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, help="--watch: seconds between reads"
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="--watch: stop after this many reads")
@click.option("--timeout", type=click.FloatRange(min=1), default=15.0, show_default=True, help="seconds for DHT reads")
@click.option("--swarm-key", "swarm_key", type=click.Path(dir_okay=False), default=None,
              help="the swarm's key file, to read a swarm that has one")  # fmt: skip
@user_errors
def status(
    initial_peers: tuple[str, ...],
    run_id: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
    count: int | None,
    timeout: float,
    swarm_key: str | None,
) -> None:
    """List the live peers of the swarm reachable through --initial-peers: cloud, step, loss, samples/s, epsilon."""
    from p2pfed.config import check_initial_peers

    check_initial_peers(initial_peers)
    from p2pfed.status import StatusReader, add_rates, render_status, status_table

    with StatusReader(list(initial_peers), timeout=timeout, swarm_key=swarm_key) as reader:
        if not watch:
            runs = reader.read(run_id, patience=min(timeout, 10.0))
            click.echo(json.dumps(runs, indent=2)) if as_json else render_status(runs)
            return
        from rich.live import Live

        before: dict[str, tuple[float, int, float | None]] = {}

        def read(first: bool) -> list[dict[str, Any]]:
            runs = reader.read(run_id, patience=min(timeout, 10.0) if first else 0.0)
            add_rates(runs, before)
            return runs

        reads = 0
        if as_json:
            while count is None or reads < count:
                if reads:
                    time.sleep(interval)
                click.echo(json.dumps({"time": round(time.time(), 3), "runs": read(reads == 0)}))
                sys.stdout.flush()
                reads += 1
            return
        with Live(status_table(read(True)), auto_refresh=False) as live:
            reads = 1
            while count is None or reads < count:
                time.sleep(interval)
                live.update(status_table(read(False)), refresh=True)
                reads += 1


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where to write the plots and summary.md (default: RUN_DIR/report)",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="run config whose `cost` prices to use (default: the built-in prices)",
)
@_set_option
@user_errors
def report(run_dir: str, out_dir: str | None, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Plots (eval loss vs time and tokens, bytes per round by cloud pair) and a markdown summary with the run's
    egress cost per cloud pair, next to what sync fp32 averaging would have cost."""
    from p2pfed.config import load_config
    from p2pfed.run_report import write_run_report

    cfg = load_config(config_path, overrides)
    written = write_run_report(Path(run_dir), out=Path(out_dir) if out_dir else None, cost=cfg.cost)
    for path in written:
        click.echo(str(path))


@main.group()
def config() -> None:
    """Inspect configuration: the resolved run config, or the reference of every key."""


@config.command("show")
@_config_option
@_set_option
@user_errors
def config_show(config_path: str, overrides: tuple[str, ...]) -> None:
    """Print the run config with defaults filled in and --set applied, as YAML."""
    import yaml

    from p2pfed.config import load_config

    click.echo(yaml.safe_dump(load_config(config_path, overrides).model_dump(), sort_keys=False), nl=False)


@config.command("reference")
def config_reference() -> None:
    """Print the configuration reference (markdown), generated from the config classes."""
    from p2pfed.config_reference import reference_markdown

    click.echo(reference_markdown(), nl=False)


@main.group()
def bench() -> None:
    """Benchmarks that print ours / reference ratios measured in one run."""


@bench.command("wan")
@_config_option
@_set_option
@click.option("--peers", "n_peers", type=click.IntRange(min=2, max=200), default=3, show_default=True)
@click.option("--rate-mbit", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="each peer's link rate, each way")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), help="logs, reports, params (default: a temp dir)")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True, help="stop after seconds")
@click.option("--runner", type=click.Choice(["p2pfed", "hivemind"]), default="p2pfed", show_default=True,
              help="hivemind: the hivemind.Optimizer reference on the same model and data")  # fmt: skip
@click.option("--target-loss", type=float, default=None, help="report the time until every peer's eval loss <= it")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@user_errors
def bench_wan(
    config_path: str,
    overrides: tuple[str, ...],
    n_peers: int,
    rate_mbit: float,
    max_steps: int,
    run_dir: str | None,
    timeout: float,
    runner: str,
    target_loss: float | None,
    as_json: bool,
) -> None:
    """Peers in network namespaces behind tbf rate-limited links (needs root; not part of the test suite)."""
    import logging

    from p2pfed.bench.wan import WanOptions, run_wan

    options = WanOptions(
        config=config_path, peers=n_peers, rate_mbit=rate_mbit, max_steps=max_steps, overrides=list(overrides),
        run_dir=run_dir, timeout=timeout, runner=runner, target_loss=target_loss,
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    res = run_wan(options)
    if as_json:
        click.echo(json.dumps(res))
    else:
        cols = "peer exit_code steps compute_s wall_s startup_s train_compute_s train_wall_s bytes_sent wire_s"
        cols += " rounds_ok rounds_failed eval_loss"
        click.echo("  ".join(cols.split()))
        for r in res["peers"]:
            cells = (f"{r[c]:.4g}" if isinstance(r.get(c), float) else f"{r.get(c)}" for c in cols.split())
            click.echo("  ".join(cells))
        for key in (k for k in res if k != "peers"):
            click.echo(f"{key}: {res[key]}")
    failed = res["interrupted"] or res["leftovers"] or any(r["exit_code"] != 0 for r in res["peers"])
    sys.exit(130 if res["interrupted"] else int(bool(failed)))


_run_dir_option = click.option(
    "--run-dir", type=click.Path(file_okay=False), help="logs and reports (default: a temp dir)"
)
_swarm_timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=1), default=1200.0, show_default=True, help="per swarm"
)
_json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object")


@bench.command("comm")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/tiny-lowcomm.yaml",
              show_default=True, help="our side's run; the baseline is the same with sync fp32 averaging")  # fmt: skip
@_set_option
@click.option("--peers", "n_peers", type=click.IntRange(min=2, max=16), default=3, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=200, show_default=True)
@_run_dir_option
@_swarm_timeout_option
@_json_option
@user_errors
def bench_comm(
    config_path: str,
    overrides: tuple[str, ...],
    n_peers: int,
    max_steps: int,
    run_dir: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Bytes sent per trained token, and eval loss, vs synchronous fp32 gradient averaging every step."""
    from p2pfed.bench.comm import run_comm

    result = run_comm(
        config=config_path, overrides=overrides, peers=n_peers, max_steps=max_steps, run_dir=run_dir,
        timeout=timeout, say=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"bytes per token: {result['bytes_per_token']:.2f} (baseline {result['baseline_bytes_per_token']:.1f}), "
            f"reduction {result['reduction']:.0f}x\n"
            f"eval loss: {result['eval_loss']:.4f} (baseline {result['baseline_eval_loss']:.4f}), "
            f"ratio {result['eval_loss_ratio']:.3f}"
        )


@bench.command("hetero")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/tiny.yaml",
              show_default=True, help="the run both sides train")  # fmt: skip
@_set_option
@click.option("--slowdowns", default="1,1,3", show_default=True, help="one peer per value: its profile's slowdown")
@click.option("--global-batch", type=click.IntRange(min=1), default=96, show_default=True,
              help="samples per step for the whole swarm, on both sides")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=1), default=150, show_default=True)
@click.option("--target-loss", type=float, default=None, help="also time each side until every peer reaches it")
@_run_dir_option
@_swarm_timeout_option
@_json_option
@user_errors
def bench_hetero(
    config_path: str,
    overrides: tuple[str, ...],
    slowdowns: str,
    global_batch: int,
    max_steps: int,
    target_loss: float | None,
    run_dir: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Peers of different speeds: fast peers' waiting fraction and time to a target loss, fixed vs adaptive batches."""
    from p2pfed.bench.hetero import run_hetero

    try:
        values = [float(v) for v in slowdowns.split(",")]
    except ValueError:
        raise UserError(f"--slowdowns must be numbers separated by commas, got {slowdowns!r}") from None
    if len(values) < 2 or any(v < 1.0 for v in values):
        raise UserError(f"--slowdowns needs at least two values, each >= 1, got {slowdowns!r}")
    result = run_hetero(
        config=config_path, overrides=overrides, slowdowns=values, global_batch=global_batch, max_steps=max_steps,
        target_loss=target_loss, run_dir=run_dir, timeout=timeout, say=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    _print_result({k: v for k, v in result.items() if not isinstance(v, dict)} if not as_json else result, as_json)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's result: one JSON object, or a `key: value` line per figure."""
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


@bench.command("link")
@click.option("--peers", "n_peers", type=click.IntRange(min=2, max=16), default=3, show_default=True)
@click.option("--rate-mbit", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="each peer's link rate, each way")  # fmt: skip
@click.option("--numel", type=click.IntRange(min=1), default=5_000_000, show_default=True, help="fp32 elements")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="timed rounds (median)")
@click.option("--compression", type=click.Choice(list(COMPRESSION_NAMES)), default="none", show_default=True)
@click.option("--transport", type=click.Choice(["libp2p", "tcp"]), default="libp2p", show_default=True)
@click.option("--schedule", type=click.Choice(["butterfly", "ring"]), default="butterfly", show_default=True,
              help="averaging.schedule")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@user_errors
def bench_link(
    n_peers: int,
    rate_mbit: float,
    numel: int,
    rounds: int,
    compression: str,
    transport: str,
    schedule: str,
    as_json: bool,
) -> None:
    """Share of a tbf-limited link's rate that one averaging round gets (needs root; not part of the tests)."""
    import logging

    from p2pfed.bench.link import run_link

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = run_link(
        n_peers=n_peers, rate_mbit=rate_mbit, numel=numel, rounds=rounds, compression=compression,
        transport=transport, schedule=schedule,
    )  # fmt: skip
    _print_result(result, as_json)
    sys.exit(1 if result["leftovers"] else 0)


@bench.command("secagg")
@click.option("--peers", "n_peers", type=click.IntRange(min=2, max=16), default=3, show_default=True)
@click.option("--numel", type=click.IntRange(min=1), default=25_000_000, show_default=True, help="fp32 elements")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="timed rounds (median)")
@click.option("--compression", type=click.Choice(["none", "fp16", "uint8"]), default="uint8", show_default=True)
@click.option("--transport", type=click.Choice(["libp2p", "tcp"]), default="libp2p", show_default=True)
@click.option("--rate-mbit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="run behind tbf links of this rate, each way (needs root); default: loopback")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@user_errors
def bench_secagg(
    n_peers: int, numel: int, rounds: int, compression: str, transport: str, rate_mbit: float | None, as_json: bool
) -> None:
    """Masked vs plain averaging round: time and bytes ratios (privacy.secure_aggregation)."""
    from p2pfed.bench.secagg import run_secagg

    result = run_secagg(
        n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport,
        rate_mbit=rate_mbit,
    )  # fmt: skip
    _print_result(result, as_json)
    sys.exit(1 if result["leftovers"] else 0)


@bench.command("dp")
@_config_option
@_set_option
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="training steps per side")
@click.option("--target-epsilon", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
              help="epsilon the private side ends at (its noise multiplier is chosen for it)")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's choice)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@user_errors
def bench_dp(
    config_path: str, overrides: tuple[str, ...], steps: int, target_epsilon: float, threads: int | None, as_json: bool
) -> None:
    """DP-SGD vs non-private training on one peer: step time ratio and eval loss at a target epsilon."""
    from p2pfed.bench.dp import run_dp_bench
    from p2pfed.config import load_config

    cfg = load_config(config_path, list(overrides))
    result = run_dp_bench(cfg, steps=steps, target_epsilon=target_epsilon, threads=threads)
    _print_result(result, as_json)


@bench.command("hivemind-peer", hidden=True)
@_config_option
@_set_option
@click.option("--listen", required=True, help="multiaddr to listen on")
@click.option("--initial-peers", default=None, help="a reference peer's bootstrap multiaddr")
@click.option("--index", type=click.IntRange(min=0), required=True, help="this peer's data shard")
@click.option("--peers", "n_peers", type=click.IntRange(min=1), required=True, help="peers (and shards) in all")
@click.option("--max-steps", type=click.IntRange(min=1), required=True, help="optimizer steps of the swarm")
@click.option("--target-batch-size", type=click.IntRange(min=1), default=None, help="default: batch_size x peers")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None)
@user_errors
def bench_hivemind_peer(
    config_path: str,
    overrides: tuple[str, ...],
    listen: str,
    initial_peers: str | None,
    index: int,
    n_peers: int,
    max_steps: int,
    target_batch_size: int | None,
    report_path: str | None,
) -> None:
    """A hivemind.Optimizer peer on p2pfed's model and data: the reference that `bench wan --runner hivemind` runs."""
    from pathlib import Path

    from p2pfed.bench.hivemind_peer import run_reference_peer

    report = run_reference_peer(
        config=config_path, overrides=overrides, listen=listen, initial_peers=initial_peers, index=index,
        peers=n_peers, max_steps=max_steps, target_batch_size=target_batch_size,
        emit=click.echo,
    )  # fmt: skip
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2))


@bench.command("allreduce")
@click.option("--peers", "n_peers", type=click.IntRange(min=2, max=16), default=3, show_default=True)
@click.option("--numel", type=click.IntRange(min=1), default=25_000_000, show_default=True, help="fp32 elements")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="timed rounds (median)")
@click.option(
    "--compression",
    type=click.Choice(list(COMPRESSION_NAMES)),
    default="none",
    show_default=True,
)
@click.option("--transport", type=click.Choice(["libp2p", "tcp"]), default="libp2p", show_default=True,
              help="how the averagers exchange parts (averaging.transport)")  # fmt: skip
@click.option("--sealed", is_flag=True, help="with --transport tcp: seal the connections with a swarm key")
@click.option("--schedule", type=click.Choice(["butterfly", "ring"]), default="butterfly", show_default=True,
              help="averaging.schedule")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print JSON: p2pfed_s, gloo_s, ratio")
@user_errors
def bench_allreduce(
    n_peers: int,
    numel: int,
    rounds: int,
    compression: str,
    transport: str,
    sealed: bool,
    schedule: str,
    as_json: bool,
) -> None:
    """Time one averaging round of an fp32 tensor across local peers vs torch.distributed gloo all_reduce."""
    from p2pfed.bench.allreduce import run_bench

    if sealed and transport != "tcp":
        raise UserError("--sealed seals direct TCP connections (libp2p streams are sealed anyway): add --transport tcp")
    result = run_bench(
        n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport, sealed=sealed,
        schedule=schedule,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result))
    else:
        rows = [
            (f"p2pfed ({schedule} over {transport}):", f"{result['p2pfed_s']:.3f} s"),
            ("  of which the all-reduce itself:", f"{result['allreduce_s']:.3f} s"),
            ("torch.distributed gloo all_reduce:", f"{result['gloo_s']:.3f} s"),
            ("ratio p2pfed / gloo:", f"{result['ratio']:.2f}x"),
            ("ratio all-reduce / gloo:", f"{result['allreduce_ratio']:.2f}x"),
            ("max |p2pfed - exact mean|:", f"{result['max_abs_error']:.2e}"),
        ]
        click.echo(f"{n_peers} peers, {numel:,} fp32 elements ({compression}), median of {rounds} rounds:")
        for label, value in rows:
            click.echo(f"  {label:<40} {value}")


if __name__ == "__main__":
    main()
