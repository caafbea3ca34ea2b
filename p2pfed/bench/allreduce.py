"""Time one p2pfed averaging round against a torch.distributed gloo all_reduce, both measured in the same run.

    p2pfed bench allreduce --peers 3 --numel 25000000 --rounds 3 [--compression NAME] [--transport tcp [--sealed]]

N local processes each hold a different fp32 tensor of `numel` elements and average it, first with p2pfed, then with
gloo, so both figures come from the same machine under the same load:

- p2pfed: one `SwarmAverager.step()` (p2pfed's butterfly all-reduce over libp2p streams, with the chosen
  compression: none, fp16, uint8, randomk, topk or powersgd), timed from the call to its return. That includes
  matchmaking, because one training round pays for it too; all peers start each round at a barrier, and the leader
  starts the all-reduce as soon as the group is full, so it is short. `allreduce_s` is the data path alone, from the
  formed group to the averaged result, and `allreduce_ratio` its ratio to gloo (whose group exists from the start).
  With `--transport tcp` the parts travel over direct TCP between the averagers instead of libp2p streams, and with
  `--sealed` those connections are sealed as in a run with a swarm key (AES-256-GCM records, p2pfed/channel.py).
- gloo: `all_reduce(SUM)` and the division by N, over TCP on loopback.

A round takes as long as its slowest peer; each figure is the median over `rounds` timed rounds, after one untimed
warm-up round per side (connections, first matchmaking). Every p2pfed peer compares its result with the exact mean
of all peers' tensors, which it regenerates from their seeds; the largest deviation is `max_abs_error`. Everything
binds to 127.0.0.1 only.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from threading import BrokenBarrierError
from types import FrameType
from typing import Any

import torch

from p2pfed.errors import UserError

__all__ = ["Setup", "run_bench", "run_p2pfed_side"]

LISTEN = "/ip4/127.0.0.1/tcp/0"
MATCHMAKING_TIME = 0.5  # the group fills at once (everyone leaves the barrier together), so the leader barely waits
REQUEST_TIMEOUT = 3.0
ALLREDUCE_TIMEOUT = 120.0
NEXT_CHUNK_TIMEOUT = 40.0
GROUP_TIMEOUT = 60.0  # seconds one step may spend looking for its group
STARTUP_TIMEOUT = 120.0  # seconds a child may take to start its DHT and averager, or to join the gloo group
# Between two barriers a peer runs at most one whole round; the first one also waits for the slowest start-up.
BARRIER_TIMEOUT = STARTUP_TIMEOUT + GROUP_TIMEOUT + ALLREDUCE_TIMEOUT
EXIT_TIMEOUT = 30.0  # seconds for children to shut down their averager and DHT on their own
TERMINATE_TIMEOUT = 15.0  # seconds after SIGTERM before SIGKILL
ERROR_GRACE = 3.0  # after a secondary error (a broken barrier), seconds to wait for the peer that broke it

Result = dict[str, Any]


class _RoundFailed(RuntimeError):
    """A failure the bench detects itself; its message says it all, so no traceback goes with it."""


def run_bench(
    *,
    n_peers: int,
    numel: int,
    rounds: int,
    compression: str,
    transport: str = "libp2p",
    sealed: bool = False,
    schedule: str = "butterfly",
) -> dict[str, Any]:
    """Run both sides with `n_peers` local processes and return the medians, their ratio and the p2pfed error."""
    ctx = mp.get_context("spawn")  # fork would copy this process's threads and torch state into every peer
    budget = 2 * STARTUP_TIMEOUT + (rounds + 1) * (GROUP_TIMEOUT + ALLREDUCE_TIMEOUT)
    p2pfed = run_p2pfed_side(
        n_peers=n_peers, numel=numel, rounds=rounds, compression=compression, transport=transport, sealed=sealed,
        schedule=schedule,
    )  # fmt: skip

    # With init_method="tcp://127.0.0.1:PORT", rank 0's TCPStore would listen on every interface; handing it a socket
    # bound to loopback keeps the rendezvous there, and holding the port from here on means nobody can take it.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        port = int(listener.getsockname()[1])
        gloo = _run_side(
            ctx,
            "gloo",
            _gloo_rank,
            lambda rank: (rank, n_peers, numel, rounds, port, listener if rank == 0 else None),
            n_peers,
            budget,
        )
    finally:
        listener.close()

    p2pfed_s = median_of_slowest([r["times"] for r in p2pfed])
    allreduce_s = median_of_slowest([r["allreduce_times"] for r in p2pfed])
    gloo_s = median_of_slowest([r["times"] for r in gloo])
    return {
        "p2pfed_s": p2pfed_s,
        "gloo_s": gloo_s,
        "ratio": p2pfed_s / gloo_s,
        "allreduce_s": allreduce_s,
        "allreduce_ratio": allreduce_s / gloo_s,
        "max_abs_error": max(max(r["errors"]) for r in p2pfed),
        "bytes_sent_per_peer": int(statistics.mean(statistics.mean(r["bytes_sent"]) for r in p2pfed)),
        "n_peers": n_peers,
        "numel": numel,
        "rounds": rounds,
        "compression": compression,
        "transport": transport,
        "sealed": sealed,
        "schedule": schedule,
    }


def run_p2pfed_side(
    *,
    n_peers: int,
    numel: int,
    rounds: int,
    compression: str,
    transport: str,
    hosts: Sequence[str] | None = None,
    netns: Sequence[str] | None = None,
    secure: bool = False,
    sealed: bool = False,
    schedule: str = "butterfly",
) -> list[Result]:
    """p2pfed's side alone: one result per peer (times, all-reduce times, errors, bytes). Peer i listens on
    hosts[i] (default 127.0.0.1) and, when `netns` is given, runs inside network namespace netns[i]; `secure`
    masks every round (privacy.secure_aggregation); `sealed` gives the peers a swarm key, which seals direct TCP;
    `schedule` is averaging.schedule (butterfly or ring)."""
    from p2pfed.compression import COMPRESSORS

    if n_peers < 2 or numel < 1 or rounds < 1:
        raise UserError(f"need at least 2 peers, 1 element and 1 round, got {n_peers}, {numel} and {rounds}")
    if compression not in COMPRESSORS:
        raise UserError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSORS)}")
    ctx = mp.get_context("spawn")
    # Unique per run, so that this run's group key can never match another bench's or a training run's peers.
    prefix = f"p2pfed_bench_{uuid.uuid4().hex[:12]}"
    maddr_queue: Queue[list[str]] = ctx.Queue()
    barrier = ctx.Barrier(n_peers)
    budget = 2 * STARTUP_TIMEOUT + (rounds + 1) * (GROUP_TIMEOUT + ALLREDUCE_TIMEOUT)
    setup = Setup(n_peers, numel, rounds, compression, transport, prefix, secure, sealed, schedule)

    def args_for(rank: int) -> tuple[Any, ...]:
        listen = f"/ip4/{hosts[rank]}/tcp/0" if hosts else LISTEN
        return rank, setup, listen, netns[rank] if netns else None, maddr_queue, barrier

    try:
        return _run_side(ctx, "p2pfed", _p2pfed_peer, args_for, n_peers, budget)
    finally:
        maddr_queue.close()


@dataclass(frozen=True)
class Setup:
    """What every p2pfed peer of one bench run shares."""

    n_peers: int
    numel: int
    rounds: int
    compression: str
    transport: str
    prefix: str
    secure: bool = False
    sealed: bool = False
    schedule: str = "butterfly"


def median_of_slowest(times_per_peer: Sequence[Sequence[float]]) -> float:
    """A round ends when its slowest peer is done, so a round's time is the max over peers; then the median."""
    return statistics.median(max(round_times) for round_times in zip(*times_per_peer, strict=True))


# ---------------------------------------------------------------------------------------------------------- parent


def _run_side(
    ctx: SpawnContext,
    side: str,
    target: Callable[..., None],
    args_for: Callable[[int], tuple[Any, ...]],
    n_peers: int,
    budget: float,
) -> list[Result]:
    """Start one child per rank, return their results in rank order; stop every child whatever happens."""
    results: Queue[tuple[str, int, Result]] = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(*args_for(rank), results), name=f"p2pfed-bench-{side}-{rank}")
        for rank in range(n_peers)
    ]
    finished = False
    try:
        for proc in procs:
            proc.start()
        payloads = _collect(side, procs, results, budget)
        finished = True
        return payloads
    finally:
        # After a failure the other children are stuck waiting for a groupmate that is not coming: stop them now.
        _stop(procs, graceful=finished)
        results.close()


def _collect(
    side: str, procs: Sequence[SpawnProcess], results: Queue[tuple[str, int, Result]], budget: float
) -> list[Result]:
    payloads: dict[int, Result] = {}
    errors: list[tuple[int, Result]] = []
    deadline = time.monotonic() + budget
    gone_since: dict[int, float] = {}
    while len(payloads) < len(procs):
        now = time.monotonic()
        if errors and (not errors[0][1]["secondary"] or now >= errors[0][1]["seen"] + ERROR_GRACE):
            break
        if now >= deadline:
            raise RuntimeError(f"{side} bench: no result from every peer within {budget:.0f} s")
        try:
            kind, rank, payload = results.get(timeout=0.5)
        except queue.Empty:
            for rank, proc in enumerate(procs):
                if proc.exitcode is not None and rank not in payloads:
                    # Its result may still be in the pipe: give it a moment before calling the peer lost.
                    if now - gone_since.setdefault(rank, now) > 5.0:
                        raise RuntimeError(
                            f"{side} bench: peer {rank} exited with code {proc.exitcode} without a result"
                        ) from None
            continue
        if kind == "ok":
            payloads[rank] = payload
        else:
            payload["seen"] = time.monotonic()
            errors.append((rank, payload))
            errors.sort(key=lambda e: e[1]["secondary"])  # a primary error first, whenever it arrives
    if errors:
        rank, err = errors[0]
        message = f"{side} bench: peer {rank} failed: {err['message']}"
        if err["user_error"]:
            raise UserError(message)
        raise RuntimeError(message if err["expected"] else f"{message}\n{err['traceback']}")
    return [payloads[rank] for rank in range(len(procs))]


def _stop(procs: Sequence[SpawnProcess], *, graceful: bool) -> None:
    """Let children exit on their own if `graceful`, then SIGTERM (they still shut down cleanly), then SIGKILL."""
    started = [proc for proc in procs if proc.pid is not None]
    if graceful:
        _join_all(started, EXIT_TIMEOUT)
    for proc in started:
        if proc.exitcode is None:
            proc.terminate()  # the child turns SIGTERM into SystemExit, so its averager and DHT still shut down
    _join_all(started, TERMINATE_TIMEOUT)
    for proc in started:
        # Each child leads its own process group, which holds exactly what it started: its hivemind DHT and
        # averager processes and their p2pd daemons. Whatever a killed child left behind goes with the group.
        assert proc.pid is not None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already empty: the usual case
        if proc.exitcode is None:
            proc.kill()
    _join_all(started, 5.0)
    for proc in started:
        if proc.exitcode is not None:
            proc.close()


def _join_all(procs: Sequence[SpawnProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        if proc.exitcode is None:
            proc.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------------------------- children


def _child_setup() -> None:
    """Make a child stoppable by its parent only, and quiet."""
    # Its own process group: Ctrl+C in the terminal reaches only the parent, which stops the children in order,
    # and the parent can kill whatever a child leaves behind without touching anything else.
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    owner = os.getpid()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a process hivemind forked inherited this handler: act as if it had none
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that shut down averager and DHT

    signal.signal(signal.SIGTERM, on_sigterm)
    # hivemind's DHT and averager are mp.Process subclasses built for fork (the averager does not pickle), but a
    # spawned child inherits spawn as its default start method.
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)  # N peers share a few cores; more threads per peer would only fight over them
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(logging.CRITICAL)


def _ignore_sigterm() -> None:
    """From here on the child is shutting down anyway: a SIGTERM now would only cut its cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _describe(e: BaseException) -> Result:
    if isinstance(e, BrokenBarrierError):
        message = "another peer failed, or did not reach the start of the round in time"
    else:
        message = str(e) or type(e).__name__
    return {
        "message": message,
        "traceback": "".join(traceback.format_exception(e)),
        "expected": isinstance(e, _RoundFailed),
        "user_error": isinstance(e, UserError),
        # A broken barrier only says that another peer failed first: prefer that peer's error.
        "secondary": isinstance(e, BrokenBarrierError),
    }


def _peer_tensor(rank: int, numel: int) -> torch.Tensor:
    """Peer `rank`'s tensor: reproducible from its rank alone, so any peer can recompute all of them."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank), dtype=torch.float32)


def _exact_mean(n_peers: int, numel: int) -> torch.Tensor:
    total = torch.zeros(numel, dtype=torch.float64)  # float64 so the reference adds no error of its own
    for rank in range(n_peers):
        total.add_(_peer_tensor(rank, numel))
    return total.div_(n_peers).to(torch.float32)


def _p2pfed_peer(
    rank: int,
    setup: Setup,
    listen: str,
    netns: str | None,
    maddr_queue: Queue[list[str]],
    barrier: Barrier,
    results: Queue[tuple[str, int, Result]],
) -> None:
    outcome: tuple[str, int, Result]
    try:
        _child_setup()
        if netns is not None:
            _enter_netns(netns)  # before any thread, socket or child process: they all inherit it
        outcome = ("ok", rank, _p2pfed_rounds(rank, setup, listen, maddr_queue, barrier))
    except BaseException as e:
        barrier.abort()  # wake the other peers now rather than at their barrier timeout
        outcome = ("error", rank, _describe(e))
    _ignore_sigterm()
    results.put(outcome)


def _enter_netns(name: str) -> None:
    """Move this process into network namespace `name` (as `ip netns exec` does; needs root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as ns:
        if libc.setns(ns.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {name}")


def _p2pfed_rounds(rank: int, setup: Setup, listen: str, maddr_queue: Queue[list[str]], barrier: Barrier) -> Result:
    n_peers, numel, rounds, compression, transport, prefix = (
        setup.n_peers,
        setup.numel,
        setup.rounds,
        setup.compression,
        setup.transport,
        setup.prefix,
    )
    from p2pfed.actors.discovery import start_dht
    from p2pfed.admission import Admission
    from p2pfed.allreduce import SwarmAverager, listen_tcp
    from p2pfed.config import CompressionConfig
    from p2pfed.reductions import make_reduction
    from p2pfed.secagg import MaskKey, SecureAggregation

    original = _peer_tensor(rank, numel)
    expected = _exact_mean(n_peers, numel)
    dht = avg = None
    key = MaskKey() if setup.secure else None
    gather: dict[str, Any] = {}
    try:
        if rank == 0:
            dht = start_dht(initial_peers=[], listen=listen)
            maddrs = [str(m) for m in dht.get_visible_maddrs()]
            for _ in range(n_peers - 1):
                maddr_queue.put(maddrs)
        else:
            try:
                maddrs = maddr_queue.get(timeout=STARTUP_TIMEOUT)
            except queue.Empty:
                raise _RoundFailed(f"peer 0 did not publish its address within {STARTUP_TIMEOUT:.0f} s") from None
            dht = start_dht(initial_peers=maddrs, listen=listen)
        tcp = listen_tcp(listen, 0, dht) if transport == "tcp" else None
        avg = SwarmAverager(
            [original.clone()],
            dht,
            prefix=prefix,
            target_group_size=n_peers,
            min_group_size=n_peers,
            min_matchmaking_time=MATCHMAKING_TIME,
            request_timeout=REQUEST_TIMEOUT,
            allreduce_timeout=ALLREDUCE_TIMEOUT,
            chunk_timeout=NEXT_CHUNK_TIMEOUT,
            # Error feedback off: every round averages the same inputs, and a residual would change them.
            reduction=make_reduction(
                CompressionConfig(name=compression, error_feedback=False),
                seed=0,
                peer_seed=rank,  # type: ignore[arg-type]
            ),
            tcp_socket=tcp[0] if tcp is not None else None,
            secure=SecureAggregation(key, run=prefix.encode()) if key is not None else None,
            # a swarm key that every peer of this run derives alike
            admission=Admission(hashlib.sha256(prefix.encode()).digest()) if setup.sealed else None,
            ring=setup.schedule == "ring",
            shutdown_timeout=5,
            start=False,
        )
        avg.start()  # SIGINT is already ignored in this process, so the averager process inherits that too
        avg.wait_until_ready(STARTUP_TIMEOUT)

        times: list[float] = []
        allreduce_times: list[float] = []  # the data path alone: from the group's formation to the result
        errors: list[float] = []
        bytes_sent: list[int] = []
        for round_no in range(rounds + 1):
            label = "warm-up round" if round_no == 0 else f"round {round_no}"
            with avg.get_tensors() as (tensor,):
                tensor.copy_(original)  # every round averages the same inputs, so every result is checkable
            barrier.wait(BARRIER_TIMEOUT)
            t0 = time.perf_counter()
            gather["tcp"] = list(tcp[1]) if tcp is not None else None
            outcome = _one_round(avg, label, gather=gather)
            elapsed = time.perf_counter() - t0
            if not outcome["complete"]:
                raise _RoundFailed(
                    f"{label}: the all-reduce was incomplete (a peer's part was lost or a sender was banned), "
                    "so the result is not the mean of all peers"
                )
            if len(outcome["gathered"]) != n_peers:
                raise _RoundFailed(f"{label}: averaged in a group of {len(outcome['gathered'])}, not {n_peers}")
            if round_no == 0:
                continue
            times.append(elapsed)
            allreduce_times.append(float(outcome["allreduce_s"]))
            bytes_sent.append(int(outcome["bytes_sent"]))
            with avg.get_tensors() as (tensor,):
                errors.append(float((tensor - expected).abs().max()))
        # Nobody shuts down while a groupmate may still be sending it the last parts of the final round.
        barrier.wait(BARRIER_TIMEOUT)
        return {"times": times, "allreduce_times": allreduce_times, "errors": errors, "bytes_sent": bytes_sent}
    finally:
        _ignore_sigterm()
        if avg is not None:
            avg.shutdown()
        if dht is not None:
            dht.shutdown()


def _one_round(avg: Any, label: str, *, gather: Any) -> Result:
    t0 = time.perf_counter()
    control = avg.step(weight=1.0, gather=gather, timeout=GROUP_TIMEOUT, allow_retries=True, wait=False)
    try:
        outcome = control.result(GROUP_TIMEOUT + ALLREDUCE_TIMEOUT)
    except FutureTimeoutError:
        control.cancel()
        raise _RoundFailed(f"{label} did not finish within {GROUP_TIMEOUT + ALLREDUCE_TIMEOUT:.0f} s") from None
    except Exception as e:
        raise _RoundFailed(f"{label} failed after {time.perf_counter() - t0:.1f} s: {e!r}") from e
    if not isinstance(outcome, dict):
        raise _RoundFailed(f"{label}: the averager returned {outcome!r} instead of a round result")
    return outcome


def _loopback_interface() -> str:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def _gloo_rank(
    rank: int,
    n_peers: int,
    numel: int,
    rounds: int,
    port: int,
    listener: socket.socket | None,
    results: Queue[tuple[str, int, Result]],
) -> None:
    outcome: tuple[str, int, Result]
    try:
        _child_setup()
        outcome = ("ok", rank, _gloo_rounds(rank, n_peers, numel, rounds, port, listener))
    except BaseException as e:
        outcome = ("error", rank, _describe(e))
    _ignore_sigterm()
    results.put(outcome)


def _gloo_rounds(rank: int, n_peers: int, numel: int, rounds: int, port: int, listener: socket.socket | None) -> Result:
    import torch.distributed as dist

    # Gloo picks its interface from the hostname otherwise, which may well be a public one.
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    timeout = timedelta(seconds=STARTUP_TIMEOUT)  # bounds the rendezvous and every collective below
    # The same rendezvous as init_method="tcp://127.0.0.1:PORT", except that rank 0 serves on the loopback socket.
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        n_peers,
        is_master=rank == 0,
        timeout=timeout,
        master_listen_fd=listener.detach() if listener is not None else None,  # the store owns it from now on
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n_peers, timeout=timeout)
    try:
        original = _peer_tensor(rank, numel)
        tensor = original.clone()
        times: list[float] = []
        for round_no in range(rounds + 1):
            tensor.copy_(original)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(n_peers)  # part of the cost: p2pfed's result is a mean too
            elapsed = time.perf_counter() - t0
            if round_no:
                times.append(elapsed)
        dist.barrier()
        return {"times": times}
    finally:
        _ignore_sigterm()
        dist.destroy_process_group()
