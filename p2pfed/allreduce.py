"""hivemind's matchmaking and state sharing, with p2pfed's own all-reduce (p2pfed/butterfly.py) and compressors.

`SwarmAverager.step()` returns, for each round: the metadata each group member gathered, whether the round was
complete (every member's part reduced and every averaged part back, in every all-reduce of the round), and the bytes
it sent and received on the wire (payload plus framing), with bytes sent per remote peer. The averaged buffer is a
scratch buffer, written only when the round is complete: the trainer applies it only then, so a failed round never
touches the model. hivemind keeps its group matchmaking (leaders, group keys in the DHT) and state downloads.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import time
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import NoCompression
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.mpfuture import MPFuture

from p2pfed.admission import Admission
from p2pfed.butterfly import Butterfly, ButterflyStats
from p2pfed.compression import Compressor, Fp32
from p2pfed.errors import UserError
from p2pfed.hierarchy import Member, hierarchical_allreduce
from p2pfed.lifeline import start_lifeline
from p2pfed.reductions import AllReduce, Dense, Reduction, round_seed
from p2pfed.robust import Guard, Rule
from p2pfed.secagg import Group, Held, SecureAggregation, held_of

__all__ = ["SwarmAverager", "listen_tcp"]

logger = logging.getLogger(__name__)


_UPDATE_PHASES = ("dense", "coords", "topk")  # all-reduces whose vector is (part of) the update itself


class _ByteCounters:
    """Counters shared between the averager process (which counts) and the peer process (which reads)."""

    def __init__(self) -> None:
        # Only the averager process writes them, from one event loop: no lock needed.
        self.sent: Any = mp.Value(ctypes.c_double, 0.0, lock=False)
        self.received: Any = mp.Value(ctypes.c_double, 0.0, lock=False)
        self.forwarded: Any = mp.Value(ctypes.c_double, 0.0, lock=False)  # relayed for others (p2pfed/relay.py)


class SwarmAverager(DecentralizedAverager):
    """DecentralizedAverager whose step() returns a dict with the gathered metadata, completeness and bytes.

    `state_fn` runs in the peer process when another peer downloads state; it returns (metadata, tensors).
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: Any,
        *,
        state_fn: Callable[[], tuple[Any, Sequence[torch.Tensor]]] | None = None,
        reduction: Reduction | None = None,
        hierarchical: bool = False,
        tcp_socket: socket.socket | None = None,
        chunk_timeout: float = 10.0,
        secure: SecureAggregation | None = None,
        admission: Admission | None = None,
        peers_key: str | None = None,
        max_update_norm: float | None = None,
        rule: Rule | None = None,
        ring: bool = False,
        relays: Sequence[str] = (),
        die_in_allreduce: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._counters = _ByteCounters()
        self._die_in_allreduce = die_in_allreduce  # test aid: see _run_allreduce_inplace_
        self._allreduces = 0
        self._relays = [PeerID.from_base58(r) for r in relays]  # this peer takes parts only through these
        self._state_fn = state_fn
        self._reduction = reduction or Dense(Fp32())
        self._chunk_timeout = chunk_timeout
        self._hierarchical = hierarchical
        self._secure = secure  # masks every all-reduce of a round (p2pfed/secagg.py); see step()
        self._admission = admission  # who may join groups and download state (p2pfed/admission.py)
        self._peers_key = peers_key  # the run's sealed peer announcements: who may download state
        self._max_update_norm = max_update_norm  # members' copies of an update over this are dropped (None: no bound)
        self._rule = rule  # a robust rule instead of the weighted mean of dense updates (p2pfed/robust.py)
        self._ring = ring  # averaging.schedule ring: elementwise all-reduces go around a ring (p2pfed/ring.py)
        self._schedule_said = ""  # the schedule the log last named, so it says so once per change
        self._tcp_socket = tcp_socket  # listening; inherited by the averager process, which accepts on it
        self._butterfly: Butterfly | None = None  # made in the averager process, on its event loop
        # A failed masked round: its group id (hex) and, per all-reduce (phase), the pieces of its result this peer
        # holds and their values, for the round that re-forms it (secagg.keep_held); and what step() reports of them
        self._held: tuple[str, dict[str, _Pieces]] | None = None
        self._held_report: dict[str, Any] | None = None
        kwargs.setdefault("state_compression", NoCompression())
        super().__init__(averaged_tensors, dht, **kwargs)

    def run(self) -> None:
        start_lifeline()  # this process exits when the peer's main process dies
        super().run()

    def step(self, gather: Any = None, weight: float | None = None, **kwargs: Any) -> Any:
        """hivemind's step; with secure aggregation, `gather` (a dict) also carries this member's mask key and, so
        that a dense round needs no extra exchange for its fixed-point scale, its weight and largest |value|."""
        if self._admission is not None:
            gather = dict(gather or {})
            gather["admit"] = self._admission.token(self.peer_id.to_bytes())
        if self._secure is not None:
            with self.get_tensors() as tensors:
                maxabs = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
            gather = dict(gather or {})
            weight_now = 1.0 if weight is None else float(weight)
            gather["secagg"] = {"key": self._secure.key.public, "maxabs": maxabs, "weight": weight_now}
        return super().step(gather=gather, weight=weight, **kwargs)

    @property
    def bytes_sent(self) -> int:
        return int(self._counters.sent.value)

    @property
    def bytes_received(self) -> int:
        return int(self._counters.received.value)

    @property
    def bytes_forwarded(self) -> int:
        return int(self._counters.forwarded.value)

    def serve_relayed(self, *, timeout: float) -> None:
        """Take the parts this peer's relays forward (a relayed peer is in client mode: no handlers of its own)."""
        future: MPFuture[None] = MPFuture()
        self._outer_pipe.send(("_serve_relayed", [], {"future": future}))
        future.result(timeout)

    async def _serve_relayed(self, future: MPFuture[None]) -> None:
        try:
            await self._get_butterfly().serve_relayed(self._relays)
            future.set_result(None)
        except Exception as e:
            future.set_exception(e)

    def set_target_group_size(self, size: int) -> None:
        """Start all-reduce as soon as `size` peers have joined a group (else after the matchmaking time)."""
        self._outer_pipe.send(("_set_target_group_size", [size], {}))

    async def _set_target_group_size(self, size: int) -> None:
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        # The key manager only uses it to re-draw group bits, which p2pfed does not use ("" = one bucket); with a
        # fixed size it fails on any larger group ("Sample larger than population"), so let it follow the group.
        self._matchmaking.group_key_manager.target_group_size = None

    def set_deadlines(self, allreduce_timeout: float, matchmaking_time: float) -> None:
        """The next rounds' all-reduce deadline (a third of it for each read or write of a stream) and the least time
        matchmaking waits for a group to fill."""
        self._outer_pipe.send(("_set_deadlines", [allreduce_timeout, matchmaking_time], {}))

    async def _set_deadlines(self, allreduce_timeout: float, matchmaking_time: float) -> None:
        self._allreduce_timeout = allreduce_timeout
        self._chunk_timeout = allreduce_timeout / 3
        if self._butterfly is not None:
            self._butterfly.chunk_timeout = self._chunk_timeout
        self._matchmaking.min_matchmaking_time = matchmaking_time
        self._matchmaking.potential_leaders.min_matchmaking_time = matchmaking_time

    def _get_butterfly(self) -> Butterfly:
        if self._butterfly is None:
            self._butterfly = Butterfly(
                self._p2p,
                name=f"{self.prefix}.part",
                chunk_timeout=self._chunk_timeout,
                on_forwarded=self._forwarded,
                seal_key=self._admission.seal_key if self._admission is not None else None,
            )
        return self._butterfly

    def _forwarded(self, n: int) -> None:
        self._counters.forwarded.value += n

    async def add_p2p_handlers(self, p2p: Any, *args: Any, **kwargs: Any) -> None:
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        if p2p is self._p2p:  # this averager's own servicer, not hivemind's test harness replicas
            await self._get_butterfly().serve()
            if self._tcp_socket is not None:
                await self._get_butterfly().serve_tcp(self._tcp_socket)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        self._last_stats: ButterflyStats | None = None
        self._held_report = None
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        stats = self._last_stats
        return {
            "gathered": {peer.to_base58(): data for peer, data in gathered.items()},
            "complete": stats is not None and not stats.reason,
            "reason": stats.reason if stats is not None else "no all-reduce ran",
            "allreduce_s": stats.seconds if stats else 0.0,
            "dropped": len(stats.dropped) if stats else 0,
            "unreachable": sorted(stats.unreachable) if stats else [],
            "not_joined": sorted(stats.not_joined) if stats else [],
            "held": stats.held if stats else False,
            "held_pieces": self._held_report,
            "bytes_sent": stats.bytes_sent if stats else 0,
            "bytes_received": stats.bytes_received if stats else 0,
            "sent_by_peer": dict(stats.sent_by_peer) if stats else {},
        }

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs: Any
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        self._running_groups[group_id].set_result(None)  # hivemind's bookkeeping: this group's all-reduce started
        gathered = self._gathered(group_info)
        held, self._held = self._held, None
        if self._admission is not None:  # before any byte of an update moves
            for peer, info in zip(group_info.peer_ids, gathered, strict=True):
                reason = self._admission.check(peer.to_bytes(), info.get("admit"), name=peer.to_base58())
                if reason:
                    logger.warning("round refused: %s", reason)
                    self._last_stats = ButterflyStats(reason=f"not admitted: {reason}")
                    return
        (buffer,) = tensors
        claims: _Claims | str | None = None
        if self._secure is not None:
            refusal = _reform_refusal(group_info, gathered)
            claims = None if refusal else _held_claims(gathered)
            if isinstance(claims, str):
                refusal = claims
            if refusal:
                logger.warning("round refused: %s", refusal)
                self._last_stats = ButterflyStats(reason=refusal)
                return
        self._allreduces += 1
        peers = list(group_info.peer_ids)
        me = peers.index(self.peer_id)
        butterfly = self._get_butterfly()
        # test aid: a machine that vanishes mid-transfer: its parts have left, its slice's means have not, and it dies
        # once the first averaged piece of its round is back (a reducer holds a piece of the result), in the round's
        # first masked all-reduce under secure aggregation, or at the end
        dying = f"fault injection: dying in the middle of round {self._allreduces}"
        die = self._allreduces == self._die_in_allreduce
        butterfly.on_reply, butterfly.hold_replies = None, False
        shares = _relayed_shares([float(f) for f in kwargs["peer_fractions"]], gathered, butterfly.via, peers)
        weight = 1.0 if kwargs.get("weight") is None else float(kwargs["weight"])
        stats = ButterflyStats()
        self._last_stats = stats

        members = _members(group_info, gathered, shares, weight) if self._hierarchical else None
        routes = _routes(group_info, gathered)
        # a ring needs every member to take a stream from the one before it: none in client mode or behind a relay
        # (in hierarchical mode, only the delegates across clouds go around it: hierarchical_allreduce checks them)
        ring = self._ring and self._secure is None
        if ring and ((members is None and not all(s > 0 for s in shares)) or _relayed(peers, butterfly.via)):
            ring = False
            if self._schedule_said != "butterfly":
                logger.warning(
                    "averaging.schedule ring: a member of this group cannot take streams (client mode or behind a "
                    "relay), so its rounds go by butterfly"
                )
                self._schedule_said = "butterfly"
        elif ring and self._schedule_said != "ring":
            where = "the delegates' all-reduces across clouds go" if members is not None else "all-reduces go"
            logger.info("%s around a ring (averaging.schedule ring)", where)
            self._schedule_said = "ring"
        # the same on every member: shared-seed compressors draw alike (in a re-formed round, as in the failed one)
        seed = round_seed(group_id if not isinstance(claims, tuple) else bytes.fromhex(claims[0]))
        phases: dict[str, _Pieces] = {}  # masked all-reduces: what this peer holds of each (a failed round keeps it)

        async def plain_allreduce(
            vector: torch.Tensor,
            codec: Compressor,
            phase: str,
            reply: Compressor | None = None,
            clear: torch.Tensor | None = None,
        ) -> torch.Tensor | None:
            tag, timeout = group_id + phase.encode(), self._allreduce_timeout or 60.0
            if die and (self._secure is None or phase.endswith(".ring")):  # test aid: see above
                butterfly.on_reply, butterfly.hold_replies = (lambda: _die(dying)), True
            # Every copy must be finite; the norm bound holds for the update and any part of it (dense, its shared
            # coordinates, its top-k), not for PowerSGD's projections.
            guard = Guard(max_norm=self._max_update_norm if phase in _UPDATE_PHASES else None)
            if ring and members is None and codec.elementwise and self._rule is None:
                mean, phase_stats = await butterfly.ring_allreduce(
                    tag,
                    peers,
                    me,
                    vector.reshape(-1),
                    weight=weight,
                    codec=codec,
                    round=seed,
                    timeout=timeout,
                    routes=routes,
                    guard=guard,
                )
            elif members is not None:
                mean, phase_stats = await hierarchical_allreduce(
                    butterfly,
                    tag,
                    members,
                    me,
                    vector.reshape(-1),
                    codec=codec,
                    round=seed,
                    timeout=timeout,
                    routes=routes,
                    guard=guard,
                    ring=ring,
                )
            else:
                mean, phase_stats = await butterfly.allreduce(
                    tag,
                    peers,
                    me,
                    vector.reshape(-1),
                    weight=weight,
                    shares=shares,
                    codec=codec,
                    round=seed,
                    timeout=timeout,
                    routes=routes,
                    reply_codec=reply,
                    guard=guard,
                    rule=self._rule if phase == "dense" else None,
                    clear=clear,
                )
            stats.merge(phase_stats)
            holding = held_of(mean, phase_stats) if self._secure is not None and phase.endswith(".ring") else None
            if holding is not None:
                phases[phase.removesuffix(".ring")] = holding
            for drop in phase_stats.dropped:
                logger.warning("dropped a contribution: %s", drop)
            return mean

        allreduce: AllReduce = plain_allreduce
        if self._secure is not None:
            relayed = {i for i, peer in enumerate(peers) if peer in butterfly.via}
            kept = _held_phases(claims, held, me) if isinstance(claims, tuple) else {}
            if isinstance(kept, str):
                stats.reason = kept
                return
            group = _mask_group(group_info, gathered, me, group_id, shares=shares, relayed=relayed, held=kept)
            if isinstance(group, str):
                stats.reason = group
                return
            if kept:
                count = sum(b - a for h in kept.values() for a, b, whole in h.pieces[me] if whole)
                logger.info("re-formed masked round: keeping the %d values of the failed one this peer holds", count)
            allreduce = functools.partial(
                self._secure.allreduce,
                inner=plain_allreduce,
                group=group,
                scaled={"dense"} if isinstance(self._reduction, Dense) else set(),  # its vector is the step's tensor
            )

        t0 = time.perf_counter()
        try:
            mean = await self._reduction.run(buffer.reshape(-1), allreduce, round=seed)
        finally:
            stats.seconds = time.perf_counter() - t0
            self._counters.sent.value += stats.bytes_sent
            self._counters.received.value += stats.bytes_received
        if die:
            _die(dying)
        if mean is None:
            stats.reason = stats.reason or "the all-reduce failed"
            if self._secure is not None and members is None and not _relayed(peers, butterfly.via):
                self._keep_pieces(group_id, phases)
            return
        buffer.reshape(-1).copy_(mean)

    def _keep_pieces(self, group_id: bytes, phases: dict[str, _Pieces]) -> None:
        """Keep the pieces of a failed masked round's result that this peer holds (per all-reduce: the ones that
        completed are held whole by every member), for the round that re-forms it, and report where they are and the
        largest |value| among the whole ones."""
        report = {}
        for phase, (pieces, values) in phases.items():
            whole = [float(values[a:b].abs().max()) for a, b, w in pieces if w and values is not None]
            report[phase] = {"pieces": [[a, b, w] for a, b, w in pieces], "abs": max(whole, default=0.0)}
        self._held = (group_id.hex(), phases)
        self._held_report = {"round": group_id.hex(), "phases": report}

    def _gathered(self, group_info: GroupInfo) -> list[dict[str, Any]]:
        """What each member passed as `gather` to step(), in group order ({} for a member that passed none)."""
        return [self._user_gather(blob) for blob in group_info.gathered]

    def _user_gather(self, blob: bytes) -> dict[str, Any]:
        """The `gather` dict inside one member's hivemind gather blob ({} when there is none or it is malformed)."""
        try:
            user = self.serializer.loads(self.serializer.loads(blob)[2])
        except Exception:
            return {}
        return user if isinstance(user, dict) else {}

    # hivemind reads the message types from these annotations, and knows a stream only by typing.AsyncIterator
    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:
        """A leader turns away a peer that is not admitted before it can enter the group."""
        if self._admission is not None:
            remote = context.remote_id
            admit = self._user_gather(request.gather).get("admit")
            reason = self._admission.check(remote.to_bytes(), admit, name=remote.to_base58())
            if reason:
                logger.warning("join request refused: %s", reason)
                yield averaging_pb2.MessageFromLeader(code=averaging_pb2.MessageCode.BAD_GROUP_KEY)
                return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:
        """State goes only to admitted peers: on the lists, and (with a swarm key) with a sealed announcement."""
        if self._admission is not None:
            remote = context.remote_id.to_base58()
            reason = self._admission.check(b"", None, name=remote) if self._admission.key is None else ""
            if not reason and self._admission.key is not None:
                reason = self._admission.check(b"", None, name=remote) if remote in self._admission.revoke else ""
                if not reason and self._admission.allow and remote not in self._admission.allow:
                    reason = f"peer {remote} is not on privacy.allow"
                if not reason and not await self._announced(remote):
                    reason = f"peer {remote} has no announcement sealed with this swarm's key"
            if reason:
                logger.warning("state download refused: %s", reason)
                return
        async for part in super().rpc_download_state(request, context):
            yield part

    async def _announced(self, peer: str) -> bool:
        if self._peers_key is None:
            return False
        try:
            found = await self.dht.get(self._peers_key, latest=True, return_future=True)
        except Exception:
            return False
        return found is not None and isinstance(found.value, dict) and peer in found.value

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Any]:
        if self._state_fn is None:
            return super().get_current_state()
        metadata, tensors = self._state_fn()
        return metadata, tensors, None


def _members(
    group_info: GroupInfo, gathered: Sequence[dict[str, Any]], shares: Sequence[float], weight: float
) -> list[Member]:
    """The group with each member's cloud label and weight (for hierarchical rounds)."""
    return [
        Member(peer, str(info.get("cloud", "")), float(info.get("weight", weight)), float(share))
        for peer, info, share in zip(group_info.peer_ids, gathered, shares, strict=True)
    ]


def _mask_group(
    group_info: GroupInfo,
    gathered: Sequence[dict[str, Any]],
    me: int,
    group_id: bytes,
    *,
    shares: Sequence[float],
    relayed: Collection[int],
    held: dict[str, Held],
) -> Group | str:
    """The group as secure aggregation needs it, or the reason it cannot mask (a member published no mask key).
    `shares` split each vector among the reducers; `relayed`: the members reached through a relay."""
    publics, maxabs, weights = [], [], []
    for peer, info in zip(group_info.peer_ids, gathered, strict=True):
        mine = info.get("secagg")
        if not isinstance(mine, dict):
            mine = {}
        key = mine.get("key")
        if not isinstance(key, bytes) or len(key) != 32:
            return f"member {peer.to_base58()[-6:]} has no mask key (privacy.secure_aggregation off there?)"
        publics.append(key)
        maxabs.append(float(mine.get("maxabs", math.inf)))
        weights.append(float(mine.get("weight", 1.0)))
    return Group(
        peers=[p.to_bytes() for p in group_info.peer_ids], publics=publics, me=me, tag=group_id,
        maxabs=maxabs, weights=weights, shares=shares, relayed=frozenset(relayed), held=held,
    )  # fmt: skip


_Pieces = tuple[list[tuple[int, int, bool]], "torch.Tensor | None"]  # pieces held (start, stop, whole), their values
_Claims = tuple[str, dict[str, list[list[tuple[int, int, bool]]]], dict[str, float]]  # see _held_claims


def _reform_refusal(group_info: GroupInfo, gathered: Sequence[dict[str, Any]]) -> str:
    """Why this masked group may not run (empty: it may). A re-formed masked round must be made of exactly the
    members left of the failed round, each re-forming it: a member re-forms only when it holds no piece of the failed
    result (phases.may_reform), so then no one who sees the new mean also holds the old one. A member left out, or one
    that is not re-forming, refuses it for everyone; plain rounds claim nothing."""
    claims = set()
    for info in gathered:
        claim = info.get("reform") or []
        if not isinstance(claim, list) or not all(isinstance(peer, str) for peer in claim):
            return "a member's claim of which round it re-forms is malformed"
        claims.add(tuple(sorted(claim)))
    if claims == {()}:
        return ""
    members = tuple(sorted(peer.to_base58() for peer in group_info.peer_ids))
    if claims != {members}:
        return "a re-formed masked round needs exactly the members left of the failed round, each re-forming it"
    return ""


def _held_claims(gathered: Sequence[dict[str, Any]]) -> _Claims | str | None:
    """What the members of a re-formed masked round hold of the failed round's result: (the failed round's group id,
    per all-reduce (phase) the pieces each member holds in group order, and the largest |value| held whole). None: no
    member says (a plain round). Else why the claims cannot stand: every member must name the same failed round."""
    helds = [info.get("held") for info in gathered]
    if all(held is None for held in helds):
        return None
    rounds, claims, top = set(), [], dict[str, float]()
    for held in helds:
        try:
            if not (isinstance(held, dict) and isinstance(held["phases"], dict)):
                raise TypeError
            bytes.fromhex(held["round"])  # a group id
            mine = {}
            for phase, claim in held["phases"].items():
                mine[str(phase)] = [(int(a), int(b), bool(w)) for a, b, w in claim["pieces"]]
                value = abs(float(claim["abs"]))
                if not (all(0 <= a < b for a, b, _ in mine[str(phase)]) and math.isfinite(value)):
                    raise ValueError
                top[str(phase)] = max(top.get(str(phase), 0.0), value)
        except (KeyError, TypeError, ValueError, AttributeError):
            return "a member's claim of the pieces it holds of the failed round is malformed"
        rounds.add(held["round"])
        claims.append(mine)
    if len(rounds) > 1:
        return "the members of a re-formed masked round re-form different rounds"
    pieces = {phase: [claim.get(phase, []) for claim in claims] for phase in top}
    return rounds.pop(), pieces, top


def _held_phases(claims: _Claims, held: tuple[str, dict[str, _Pieces]] | None, me: int) -> dict[str, Held] | str:
    """Per phase, what secure aggregation keeps in a re-formed round, with this peer's values of the pieces it holds
    whole; or why this peer cannot take part (it no longer has what it claimed)."""
    round_id, pieces, top = claims
    mine = held[1] if held is not None and held[0] == round_id else None
    out = {}
    for phase, members in pieces.items():
        values = mine[phase][1] if mine is not None and phase in mine else None
        if values is None and any(whole for _, _, whole in members[me]):
            return "this peer no longer has the pieces of the failed round it claims to hold"
        out[phase] = Held(pieces=members, values=values, abs=top[phase])
    return out


def _relayed(peers: Sequence[PeerID], via: dict[PeerID, PeerID]) -> bool:
    """Whether a member of this group is reached through a relay. The relay sees the replies it forwards, and no
    member can say which: then a failed masked round reports no held pieces, so once any piece went out it is not
    re-formed (its step is lost), as the relay could see both means. `via` may hold members of other rounds."""
    return any(peer in via for peer in peers)


def _relayed_shares(
    shares: list[float], gathered: Sequence[dict[str, Any]], via: dict[PeerID, PeerID], peers: Sequence[PeerID]
) -> list[float]:
    """Shares with the relayed members reducing too. hivemind gives a client-mode member (a relayed peer is one:
    it never accepts a connection) share 0; one that names a relay it is connected to takes the mean of the others'
    shares, and `via` learns which relay reaches it. Every member computes the same from the same gathered data."""
    serving = [s for s in shares if s > 0]
    for i, (peer, info) in enumerate(zip(peers, gathered, strict=True)):
        relay = info.get("relay")
        if isinstance(relay, str) and shares[i] == 0 and serving:
            via[peer] = PeerID.from_base58(relay)
            shares[i] = sum(serving) / len(serving)
        else:
            via.pop(peer, None)
    return shares


def _routes(group_info: GroupInfo, gathered: Sequence[dict[str, Any]]) -> dict[PeerID, tuple[str, int]]:
    """Direct TCP endpoints of the members that published one (averaging.transport=tcp)."""
    routes = {}
    for peer, info in zip(group_info.peer_ids, gathered, strict=True):
        endpoint = info.get("tcp")
        if isinstance(endpoint, list | tuple) and len(endpoint) == 2:
            routes[peer] = (str(endpoint[0]), int(endpoint[1]))
    return routes


def listen_tcp(listen: str, port: int, dht: Any) -> tuple[socket.socket, tuple[str, int]]:
    """A listening socket on the host of `swarm.listen`, and the (host, port) other members should dial: on a
    wildcard address, the host of this peer's first announced non-loopback multiaddr."""
    parts = listen.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        raise UserError(f"averaging.transport tcp needs swarm.listen on /ip4 or /ip6, got {listen!r}")
    host = parts[2]
    family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"averaging.tcp_port {port} on {host}: {e.strerror}") from None
    sock.listen(64)
    sock.setblocking(False)
    announced = host
    if host in ("0.0.0.0", "::"):
        visible = [str(m).split("/") for m in dht.get_visible_maddrs()]
        hosts = [m[2] for m in visible if len(m) > 2 and not m[2].startswith(("127.", "::1", "0.0.0.0"))]
        announced = hosts[0] if hosts else "127.0.0.1"
    return sock, (announced, int(sock.getsockname()[1]))


def _die(reason: str) -> None:
    """SIGKILL this peer's process group (main process, DHT, averager, p2pd), or this process alone when that group
    is not the peer's own."""
    logger.warning(reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    if os.getpgid(os.getppid()) == os.getpgrp():  # the peer's main process shares this group
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
