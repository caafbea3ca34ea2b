"""Averager: forms a group each round and all-reduces the gradient over libp2p (hivemind's butterfly all-reduce).

A round commits only when the group's all-reduce was complete and every member was at the same step; anything else is
a failed round, returned as a value with its reason. The gradient is copied into the averager's shared buffer and
copied back only on commit, so the trainer's gradient is never half-averaged.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import InvalidStateError
from dataclasses import replace
from typing import Any

import hivemind
import torch
from hivemind.utils import get_dht_time

from p2pfed.actors.base import Actor
from p2pfed.actors.discovery import peers_key
from p2pfed.actors.messages import DownloadState, RoundResult, RunRound, SetGroupSize
from p2pfed.admission import Admission
from p2pfed.allreduce import SwarmAverager, listen_tcp
from p2pfed.config import Config
from p2pfed.reductions import make_reduction
from p2pfed.relay import split_maddr, usable_relay
from p2pfed.robust import make_rule
from p2pfed.secagg import MaskKey, SecureAggregation

__all__ = ["Averager"]

logger = logging.getLogger(__name__)


class Averager(Actor):
    name = "averager"

    def __init__(
        self,
        cfg: Config,
        *,
        dht: hivemind.DHT,
        numel: int,
        shapes: Sequence[Sequence[int]] | None = None,
        state_fn: Callable[[], tuple[Any, Sequence[torch.Tensor]]],
        client_mode: bool,
        cloud: str,
        admission: Admission | None = None,
        relays: Sequence[str] = (),
        die_in_round: int | None = None,
    ) -> None:
        super().__init__()
        self.die_in_round = die_in_round  # test aid: this process group dies in the data path of that all-reduce
        self.cfg, self.dht, self.numel, self.state_fn, self.client_mode = cfg, dht, numel, state_fn, client_mode
        self.shapes = shapes  # the tensors the flat update is made of, in order (PowerSGD's matrices)
        # profile relay: full multiaddrs of the peers that may relay parts to this one (which accepts no connection)
        self.relays = [split_maddr(m) for m in relays]
        self.client_mode = client_mode or bool(relays)  # hivemind's client mode: a relayed peer only dials out
        self.cloud = cloud
        self.admission = admission
        self.buffer = torch.zeros(numel, dtype=torch.float32)
        self.avg: SwarmAverager | None = None
        self._control: Any = None  # the hivemind StepControl of the round in flight
        self.tcp_endpoint: list[Any] | None = None  # [host, port] of this averager's TCP listener
        self.mask_key = MaskKey() if cfg.privacy.secure_aggregation else None
        self._tied_rounds = 0  # rounds in a row whose members' parameters disagreed with no majority
        a = cfg.averaging
        self.deadlines = Deadlines(
            matchmaking_time=a.matchmaking_time, timeout=a.timeout, request_timeout=a.request_timeout
        )

    async def on_start(self) -> None:
        a = self.cfg.averaging
        if self.mask_key is not None and a.min_group_size < 3:
            logger.warning(
                "privacy.secure_aggregation with averaging.min_group_size %d: in a round of two members masks hide "
                "nothing (the mean minus one's own update is the other's); set it to 3 or more",
                a.min_group_size,
            )
        direct = a.transport == "tcp" and not self.relays  # a relayed peer cannot be dialed on any port
        tcp = listen_tcp(self.cfg.swarm.listen, a.tcp_port, self.dht) if direct else None
        self.tcp_endpoint = list(tcp[1]) if tcp is not None else None
        self.avg = SwarmAverager(
            [self.buffer],
            self.dht,
            state_fn=self.state_fn,
            prefix=f"p2pfed_{self.cfg.run.id}_grad",
            target_group_size=self.cfg.group_size(self.cfg.swarm.min_peers),
            min_group_size=a.min_group_size,
            min_matchmaking_time=a.matchmaking_time,
            request_timeout=a.request_timeout,
            allreduce_timeout=a.timeout,
            reduction=make_reduction(
                self.cfg.compression, seed=self.cfg.run.seed, peer_seed=_peer_seed(self.dht), shapes=self.shapes
            ),
            hierarchical=a.mode == "hierarchical",
            tcp_socket=tcp[0] if tcp is not None else None,
            secure=SecureAggregation(self.mask_key, run=self.cfg.run.id.encode()) if self.mask_key else None,
            admission=self.admission,
            peers_key=peers_key(self.cfg.run.id),
            max_update_norm=None if a.mode == "gossip" else a.max_update_norm,  # gossip averages parameters
            rule=make_rule(a.aggregation, trim_ratio=a.trim_ratio, clip_radius=a.clip_radius),
            ring=a.schedule == "ring",
            chunk_timeout=a.timeout / 3,
            client_mode=self.client_mode,
            relays=[peer_id for peer_id, _ in self.relays],
            declare_state_period=self.cfg.swarm.record_ttl,
            die_in_allreduce=self.die_in_round,
            shutdown_timeout=5,
            start=False,
        )
        # The averager process must not take Ctrl+C from the terminal: the supervisor stops it in order.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.avg.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        await asyncio.to_thread(self.avg.wait_until_ready, 60.0)
        self.avg.set_target_group_size(self.cfg.group_size(self.cfg.swarm.min_peers))
        if self.relays:
            await asyncio.to_thread(self.avg.serve_relayed, timeout=30.0)

    async def _usable_relay(self) -> str | None:
        """The first of this peer's relays its daemon is (or now gets) connected to."""
        timeout = self.cfg.averaging.request_timeout
        find = functools.partial(usable_relay, self.relays, timeout)
        try:
            return await asyncio.to_thread(self.dht.run_coroutine, find)
        except Exception as e:
            logger.warning("no relay this round: %r", e)
            return None

    def interrupt(self) -> None:
        if self._control is not None:
            _cancel(self._control)

    async def on_stop(self) -> None:
        if self.avg is not None:
            await asyncio.to_thread(self.avg.shutdown)
            self.avg = None

    @property
    def bytes_sent(self) -> int:
        return self.avg.bytes_sent if self.avg is not None else 0

    @property
    def bytes_received(self) -> int:
        return self.avg.bytes_received if self.avg is not None else 0

    @property
    def bytes_forwarded(self) -> int:
        return self.avg.bytes_forwarded if self.avg is not None else 0

    def set_state_priority(self, step: float) -> None:
        """Peers that download state prefer the most advanced peer."""
        if self.avg is not None and not self.client_mode:
            self.avg.state_sharing_priority = float(step)

    async def on_RunRound(self, msg: RunRound) -> RoundResult:
        assert self.avg is not None
        a = self.cfg.averaging
        with self.avg.get_tensors() as (buffer,):
            buffer.copy_(msg.flat_grad)
        t0 = time.perf_counter()
        wait_s = self.deadlines.matchmaking_s if msg.wait_s is None else msg.wait_s
        gossip = a.mode == "gossip"
        assert wait_s < a.round_timeout  # config validation guarantees it
        relay = await self._usable_relay() if self.relays else None
        control = self.avg.step(
            scheduled_time=get_dht_time() + wait_s,
            weight=float(msg.weight),
            gather={
                "step": msg.step,
                "fingerprint": msg.fingerprint,
                "cloud": self.cloud,
                "weight": float(msg.weight),
                "tcp": self.tcp_endpoint,
                "relay": relay,  # members reach this one through that peer (None: it reduces no part this round)
                "ready_at": get_dht_time(),
                "rate": float(msg.rate),
                "lag": float(msg.lag),
                "reform": list(msg.reform_of),
                "held": msg.held,
            },
            # Give up finding a group soon after the wait: the peer then re-reads the swarm (it may be behind, or
            # alone) instead of retrying matchmaking for the whole round_timeout; gossip simply trains on.
            timeout=min(2 * wait_s + a.request_timeout, a.round_timeout),
            allow_retries=True,
            wait=False,
        )
        self._control = control
        deadline = time.monotonic() + a.round_timeout + a.timeout
        try:
            # Poll rather than block a thread on the result, so that interrupt() can cancel the round at once.
            while not control.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"round did not finish within {a.round_timeout + a.timeout:.0f}s")
                await asyncio.sleep(0.01)
            outcome = control.result()
        except BaseException as e:
            _cancel(control)
            if isinstance(e, asyncio.CancelledError):
                raise
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return RoundResult(committed=False, group_size=0, reason=reason)
        finally:
            self._control = None
        steps = [int(d.get("step", -1)) if isinstance(d, dict) else -1 for d in outcome["gathered"].values()]
        arrived = [float(d.get("ready_at", 0.0)) for d in outcome["gathered"].values() if isinstance(d, dict)]
        mine = outcome["gathered"].get(self.dht.peer_id.to_base58(), {})
        waited = max(0.0, max(arrived, default=0.0) - float(mine.get("ready_at", 0.0))) if mine else 0.0
        result = RoundResult(
            committed=False,
            group_size=len(steps),
            max_group_step=max(steps),
            min_group_step=min(steps),
            bytes_sent=outcome["bytes_sent"],
            bytes_received=outcome["bytes_received"],
            bytes_by_cloud=_by_cloud(outcome["sent_by_peer"], outcome["gathered"]),
            dropped=outcome["dropped"],
            members=tuple(outcome["gathered"]),
            waited_s=waited,
            rates={p: float(d.get("rate", 0.0)) for p, d in outcome["gathered"].items() if isinstance(d, dict)},
            started_at=max(arrived, default=0.0),
            lag=_mean(float(d.get("lag", 0.0)) for d in outcome["gathered"].values() if isinstance(d, dict)),
        )
        if outcome["complete"]:
            spread = max(arrived, default=0.0) - min(arrived, default=0.0)
            if self.deadlines.observe(spread_s=spread, allreduce_s=float(outcome["allreduce_s"])):
                self.avg.set_deadlines(self.deadlines.allreduce_s, self.deadlines.matchmaking_s)
        if not outcome["complete"]:
            return replace(
                result,
                reason=f"incomplete all-reduce: {outcome['reason']}",
                unreachable=tuple(outcome["unreachable"]),
                not_joined=tuple(outcome["not_joined"]),
                held=bool(outcome["held"]),
                held_pieces=outcome["held_pieces"],
            )
        if gossip:  # members may be at different steps and hold different parameters: that is what gossip averages
            with self.avg.get_tensors() as (buffer,):
                msg.flat_grad.copy_(buffer)
            return replace(result, committed=True)
        if any(s != msg.step for s in steps):
            return replace(result, reason=f"group members were at different steps {sorted(steps)}")
        # A tie (two members that disagree) is left to a later round with a third member, which has a majority;
        # only after TIE_ROUNDS tied rounds in a row (a swarm of two) does the smallest peer id win.
        outliers = _diverged_members(outcome["gathered"], tie_break=self._tied_rounds + 1 >= TIE_ROUNDS)
        self._tied_rounds = self._tied_rounds + 1 if outliers is None else 0
        if outliers is None:
            return replace(result, reason="parameters of the members disagree, with no majority to tell who is right")
        if outliers:
            mine = self.dht.peer_id.to_base58() in outliers
            return replace(
                result, diverged=mine, reason=f"parameters of {len(outliers)} member(s) diverged from the group"
            )
        with self.avg.get_tensors() as (buffer,):
            msg.flat_grad.copy_(buffer)
        logger.debug("round of %d peers in %.3fs", len(steps), time.perf_counter() - t0)
        return replace(result, committed=True)

    async def on_SetGroupSize(self, msg: SetGroupSize) -> None:
        assert self.avg is not None
        self.avg.set_target_group_size(msg.size)

    async def on_DownloadState(self, msg: DownloadState) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        assert self.avg is not None
        timeout = self.cfg.averaging.timeout
        future = self.avg.load_state_from_peers(wait=False, timeout=timeout)
        try:
            state = await asyncio.to_thread(future.result, timeout * 2)
        except Exception as e:
            logger.warning("state download failed: %r", e)
            return None
        if state is None:  # hivemind found no peer sharing a state, or every download from one failed
            logger.warning("state download failed: no peer's state could be downloaded")
        return state


class Deadlines:
    """Deadlines that follow measured rounds instead of fixed timeouts. How long a round waits for a missing member
    follows how far apart members usually arrive (4 x its moving average, plus 0.5 s), and how long an all-reduce
    may take follows how long complete ones took (10 x, plus 1 s). Each stays between a floor and its configured
    ceiling (averaging.matchmaking_time, averaging.timeout), which also hold until rounds have been measured. The
    wait's floor is above averaging.request_timeout (hivemind's matchmaking needs that) and WAIT_FLOOR_S, so that a
    member's short hiccup (a checkpoint, a busy core) costs it no round."""

    WAIT_FLOOR_S = 2.0
    ALLREDUCE_FLOOR_S = 3.0

    def __init__(self, *, matchmaking_time: float, timeout: float, request_timeout: float) -> None:
        self.max_wait, self.max_allreduce = matchmaking_time, timeout
        self.wait_floor = min(matchmaking_time, max(self.WAIT_FLOOR_S, request_timeout + 0.5))
        self.matchmaking_s, self.allreduce_s = matchmaking_time, timeout
        self._spread: float | None = None
        self._allreduce: float | None = None

    def observe(self, *, spread_s: float, allreduce_s: float) -> bool:
        """Fold in a complete round; True when a deadline moved by more than 10% (the averager must be told)."""
        self._spread = spread_s if self._spread is None else 0.8 * self._spread + 0.2 * spread_s
        self._allreduce = allreduce_s if self._allreduce is None else 0.8 * self._allreduce + 0.2 * allreduce_s
        wait = min(self.max_wait, max(self.wait_floor, 4 * self._spread + 0.5))
        allreduce = min(self.max_allreduce, max(self.ALLREDUCE_FLOOR_S, 10 * self._allreduce + 1.0))
        if (
            abs(wait - self.matchmaking_s) <= 0.1 * self.matchmaking_s
            and abs(allreduce - self.allreduce_s) <= 0.1 * self.allreduce_s
        ):
            return False
        self.matchmaking_s, self.allreduce_s = wait, allreduce
        return True


# Members at one step hold the same parameters up to rounding (about one ULP per round): a relative difference in
# the sum of squares far above that means some member applied a different update.
_FINGERPRINT_RTOL = 1e-5
TIE_ROUNDS = 3  # tied rounds in a row before the smallest peer id's parameters win


def _diverged_members(gathered: dict[str, Any], *, tie_break: bool = True) -> set[str] | None:
    """Peer ids whose parameter fingerprint is not in the largest cluster of agreeing members. When two or more
    clusters are the largest (e.g. two members that disagree), the group cannot tell who is right: None, unless
    `tie_break`, where the cluster with the smallest peer id wins, so two disagreeing peers do not both download
    each other's state."""
    prints = {peer: float(d.get("fingerprint", 0.0)) for peer, d in gathered.items() if isinstance(d, dict)}
    clusters: list[set[str]] = []
    for peer in sorted(prints):
        for cluster in clusters:
            ref = prints[min(cluster)]
            if abs(prints[peer] - ref) <= _FINGERPRINT_RTOL * max(abs(ref), 1e-12):
                cluster.add(peer)
                break
        else:
            clusters.append({peer})
    if len(clusters) <= 1:
        return set()
    largest = max(len(c) for c in clusters)
    if not tie_break and sum(len(c) == largest for c in clusters) > 1:
        return None
    best = max(clusters, key=lambda c: (len(c), [-ord(ch) for ch in min(c)]))
    return set(prints) - best


def _by_cloud(sent_by_peer: dict[str, int], gathered: dict[str, Any]) -> dict[str, int]:
    """Bytes sent per remote cloud label, from bytes per remote peer and the labels the members gathered."""
    out: dict[str, int] = {}
    for peer, n in sent_by_peer.items():
        data = gathered.get(peer)
        cloud = str(data.get("cloud", "unknown")) if isinstance(data, dict) else "unknown"
        out[cloud] = out.get(cloud, 0) + n
    return out


def _peer_seed(dht: hivemind.DHT) -> int:
    """A seed of this peer's own (for rounding noise that is independent across peers), from its peer id."""
    return int.from_bytes(hashlib.blake2b(dht.peer_id.to_bytes(), digest_size=4).digest(), "little")


def _cancel(control: Any) -> None:
    """Cancel a hivemind step; it may have finished or been cancelled already, which is fine."""
    try:
        if not control.done():
            control.cancel()
    except InvalidStateError:
        pass


def _mean(values: Iterable[float]) -> float:
    seen = list(values)
    return sum(seen) / len(seen) if seen else 0.0
