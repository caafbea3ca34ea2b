"""p2pfed's butterfly all-reduce over libp2p streams: each member of a group reduces one slice of the vector.

    butterfly = Butterfly(p2p, name=f"{prefix}.part", chunk_timeout=10.0)
    await butterfly.serve()                                   # once: accept other members' parts
    out = await butterfly.allreduce(tag, peers, me, vector, weight=w, shares=s, codec=Fp16())

Member i splits its flat vector into one part per member (sizes proportional to `shares`; a client-mode member has
share 0 and reduces nothing), opens one libp2p stream to each other reducer j and writes part j through `codec`. The
reducer takes the weighted mean piece by piece (p2pfed/pieces.py: 1M elements a piece), compresses each piece's
mean once and writes that one payload back on every stream as soon as every member's copy of the piece is in; it
decodes the same payloads for itself, so all members end with identical values. One stream per (sender, reducer)
pair carries both directions: a member that can only dial out still takes part.

Strict by design: a reducer that misses a part replies with an error, and a member that misses any averaged part
gets `None` back; the caller's vector is never written, so a failed round never touches the model.

Wire format, little-endian. Request: magic "P2PF", tag length u16, tag, sender index u16, weight f64, then one
payload per piece (a pull for a broadcast: magic "P2PB", tag, sender, weight 0, seconds to wait f64). Reply, per
piece: status u8 (0 ok, 1 error, 3 this peer is not in that all-reduce), then a payload (ok) or a UTF-8 reason,
u32 length first. While a piece's mean waits for other members' copies, or the reducer has not started that
all-reduce yet (for up to chunk_timeout * 2), it sends status 2 (waiting, no body) every chunk_timeout / 3, so a
sender blames a silent member, not the live reducer that waits for it. A
payload is its header-int count u8, the int32 header ints, the data length u64, and the data. Bytes are counted on
the wire in both directions, per remote peer. On direct TCP in a run with a swarm key, all of it travels inside
sealed records (p2pfed/channel.py: SealedChannel), and a connection that does not open sealed is refused.

Why not hivemind's AllReduceRunner: it wraps every chunk in protobuf messages, tolerates missing members by keeping
a peer's own values, and its compression is fixed to hivemind's codecs (see docs/BENCHMARKS.md, B1).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P, PeerID

from p2pfed.channel import SEALED, Channel, SealedChannel, SocketChannel, StreamChannel, Unsealed
from p2pfed.compression import Compressor, Payload
from p2pfed.pieces import ButterflyStats, NotJoined, PartFailed, ReducerFailed, Slice, piece_round, piece_sizes
from p2pfed.relay import Forwarder
from p2pfed.ring import RingRound
from p2pfed.robust import Guard, Rule, all_finite
from p2pfed.wire import (
    ERROR,
    NOT_JOINED,
    OK,
    U8,
    U16,
    U32,
    WAITING,
    read_blob,
    read_piece,
    write_payload,
)

__all__ = ["Butterfly", "ButterflyStats", "Routes", "split_sizes"]

Routes = Mapping[PeerID, tuple[str, int]]  # members' direct TCP endpoints (host, port)

logger = logging.getLogger(__name__)

_MAGIC = b"P2PF"  # a part for the reducer
_PULL = b"P2PB"  # a request for a broadcast's vector
_RING = b"P2PR"  # a ring all-reduce's stream from the member before (p2pfed/ring.py)
_REQUEST = struct.Struct("<Hd")  # sender index, weight
_WAIT = struct.Struct("<d")  # seconds a puller waits for the root
_MAX_PULL_WAIT = 600.0
KEEP_IDLE_S = 300.0  # a sender reuses a direct TCP connection idle this long at most; the reducer keeps it twice that
_T = TypeVar("_T")


def split_sizes(numel: int, shares: Sequence[float]) -> list[int]:
    """Part sizes proportional to `shares` that sum to numel (largest remainders get the leftover elements)."""
    total = float(sum(shares))
    if total <= 0:
        raise ValueError(f"at least one member must reduce a part, got shares {list(shares)}")
    exact = [numel * s / total for s in shares]
    sizes = [int(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: sizes[i] - exact[i])[: numel - sum(sizes)]:
        sizes[i] += 1
    return sizes


class Butterfly:
    """Runs this peer's all-reduces and serves its slices. One per process, on the process's event loop."""

    def __init__(
        self,
        p2p: P2P,
        *,
        name: str,
        chunk_timeout: float = 10.0,
        on_forwarded: Callable[[int], None] | None = None,
        seal_key: bytes | None = None,
    ) -> None:
        """`seal_key`: direct TCP connections, both ways, are sealed under it (a run with a swarm key)."""
        self.p2p, self.name, self.seal_key = p2p, name, seal_key
        self._slices: dict[bytes, asyncio.Future[Slice]] = {}
        self._rings: dict[bytes, asyncio.Future[RingRound]] = {}
        self._handlers: set[asyncio.Future[None]] = set()  # streams being served from the TCP listener
        # direct TCP connections to reducers by (endpoint, seal key), idle since (monotonic): the next part to the same
        # endpoint under the same key takes one
        self._idle: dict[tuple[tuple[str, int], bytes | None], list[tuple[Channel, float]]] = collections.defaultdict(
            list
        )
        self._accepting: asyncio.Future[None] | None = None
        self.forwarder = Forwarder(p2p, name=name, on_bytes=on_forwarded)
        self.via: dict[PeerID, PeerID] = {}  # members that take streams only through a relay -> their relay
        self.chunk_timeout = chunk_timeout
        # test aids: a callback once each averaged piece is back whole, and a reducer whose means never go back
        self.on_reply: Callable[[], None] | None = None
        self.hold_replies = False

    @property
    def chunk_timeout(self) -> float:
        """The longest wait for any read or write of a part; a relay gives up on a silent stream after three."""
        return self._chunk_timeout

    @chunk_timeout.setter
    def chunk_timeout(self, seconds: float) -> None:
        self._chunk_timeout = seconds
        self.forwarder.idle_timeout = 3 * seconds

    async def serve(self) -> None:
        await self.p2p.add_binary_stream_handler(self.name, self._handle_stream)
        await self.forwarder.serve()

    async def serve_relayed(self, relays: Sequence[PeerID]) -> None:
        """Also take parts that `relays` forward (profile relay: true; p2pfed/relay.py)."""
        await self.forwarder.accept_from(relays, self._handle_forwarded)

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Also accept parts on a listening TCP socket (averaging.transport=tcp): no libp2p daemon in the path, and
        data moves between the kernel and tensors without a stream buffer (p2pfed/channel.py)."""
        sock.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept(sock))

    async def allreduce(
        self,
        tag: bytes,
        peers: Sequence[PeerID],
        me: int,
        vector: torch.Tensor,
        *,
        weight: float,
        shares: Sequence[float],
        codec: Compressor,
        round: int,
        timeout: float,
        routes: Routes | None = None,
        reply_codec: Compressor | None = None,
        guard: Guard | None = None,
        rule: Rule | None = None,
        clear: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ButterflyStats]:
        """The group's weighted mean of `vector` (flat fp32), or None with the reason in stats when any part failed.

        `tag` names this all-reduce on every member (group id plus a phase), `round` seeds the codec's randomness.
        `routes` maps members to direct TCP endpoints; members without one are reached over libp2p. `reply_codec`
        (default: `codec`) carries the reduced slices back, when they take another form than the parts (secure
        aggregation: masked ring elements go out, the decoded mean comes back). `guard` drops members' copies that
        are not finite or break its norm bound before this peer's slice sums them, and every averaged part that
        comes back must be finite; `rule` replaces the weighted mean of each piece (p2pfed/robust.py). `clear`
        (secure aggregation): this member's own part before masking, which its slice's codec adds apart.

        A failed all-reduce leaves in stats the pieces of the result this peer holds anyway (`pieces`, `partial`):
        the ones its slice reduced and the replies that came, which secure aggregation must know to re-run it.
        """
        replies = reply_codec or codec
        stats = ButterflyStats()
        sizes = split_sizes(vector.numel(), shares)
        parts = list(vector.split(sizes))
        out = torch.empty(vector.numel(), dtype=replies.dtype)  # each averaged part is read (or decoded) into place
        outs = list(out.split(sizes))
        got: dict[tuple[int, int], bool] = {}  # (reducer, piece index) -> whole, for each reply begun
        piece = self._slices.setdefault(tag, asyncio.get_running_loop().create_future())
        mine = Slice(
            peers=peers, senders=len(peers), size=sizes[me], codec=codec, round=round, stats=stats,
            reply_codec=replies, guard=guard, rule=rule, clear=clear,
        )  # fmt: skip
        if sizes[me] > 0:
            if not piece.done():
                piece.set_result(mine)
            mine.add_all(me, weight, parts[me])
        else:
            mine.fail("this member reduces no part")
        try:
            exchanges = [
                _failing_slice(
                    mine,
                    peers[j],
                    self._exchange(
                        peers[j],
                        tag,
                        me,
                        weight,
                        parts[j],
                        outs[j],
                        codec=codec,
                        round=round,
                        stats=stats,
                        routes=routes,
                        reply_codec=replies,
                        check_replies=guard is not None,
                        on_piece=functools.partial(_record, got, j),
                    ),
                )  # fmt: skip
                if j != me and sizes[j] > 0
                else self._own(mine, outs[j])
                for j in range(len(peers))
            ]
            gathering = asyncio.gather(*exchanges, return_exceptions=True)
            gathering.add_done_callback(_retrieve)  # a cancelled round must not log "exception never retrieved"
            results = await asyncio.wait_for(gathering, timeout)
        except TimeoutError:  # no exchange names its member: the suspects are the senders this slice still misses
            results = [PartFailed(f"all-reduce did not finish within {timeout:.0f}s")]
            stats.unreachable |= {peers[j].to_base58() for j in mine.missing() if j != me}
        finally:
            mine.fail("the all-reduce ended")  # a sender still waiting on this peer's slice gets a clear reply
            self._slices.pop(tag, None)
        stats.held = stats.held or mine.reduced > 0
        failed = any(isinstance(r, BaseException) for r in results)
        if sizes[me] > 0 and not mine.error and len(peers) > 1 and not failed:
            try:  # the round's byte count includes the replies this peer's slice still has to write
                await asyncio.wait_for(mine.all_replied.wait(), self.chunk_timeout)
            except TimeoutError:
                pass  # a sender that stopped reading only shortens the count
        for j, r in enumerate(results):
            if _gone(r) and len(results) == len(peers) and j != me:
                stats.unreachable.add(peers[j].to_base58())
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            unexpected = [f for f in failures if not isinstance(f, PartFailed | OSError | asyncio.TimeoutError)]
            if unexpected:
                raise unexpected[0]
            stats.reason = str(failures[0]) or type(failures[0]).__name__
            if sizes[me] > 0:
                got.update({(me, index): True for index in mine.decode_reduced(outs[me])})
            starts = list(itertools.accumulate([0, *sizes[:-1]]))
            bounds = [
                list(itertools.accumulate(piece_sizes(size), initial=start))
                for start, size in zip(starts, sizes, strict=True)
            ]
            stats.pieces = [(bounds[j][i], bounds[j][i + 1], whole) for (j, i), whole in sorted(got.items())]
            stats.partial = out
            return None, stats
        return out, stats

    async def ring_allreduce(
        self,
        tag: bytes,
        peers: Sequence[PeerID],
        me: int,
        vector: torch.Tensor,
        *,
        weight: float,
        codec: Compressor,
        round: int,
        timeout: float,
        routes: Routes | None = None,
        guard: Guard | None = None,
    ) -> tuple[torch.Tensor | None, ButterflyStats]:
        """The group's weighted mean of `vector` (flat fp32) by a ring (p2pfed/ring.py), or None with the reason in
        stats. Every member must take streams (no client-mode or relayed member); `codec` must be elementwise (fp32,
        fp16, 8-bit). `guard` screens this member's own update, which joins with weight 0 when it fails."""
        if not codec.elementwise:
            raise ValueError(f"a ring all-reduce needs an elementwise codec, got {type(codec).__name__}")
        stats = ButterflyStats()
        if len(peers) == 1:
            return vector.clone(), stats
        ring = RingRound(
            peers=peers, me=me, vector=vector, weight=weight, codec=codec, round=round, stats=stats,
            chunk_timeout=self.chunk_timeout, guard=guard, on_reply=self.on_reply,
        )  # fmt: skip
        future = self._rings.setdefault(tag, asyncio.get_running_loop().create_future())
        if not future.done():
            future.set_result(ring)
        nxt = peers[ring.next]
        endpoint = routes.get(nxt) if routes else None

        async def open_next() -> Channel:
            kept = self._take_idle(endpoint)
            return kept if kept is not None else await asyncio.wait_for(self._open(nxt, endpoint), self.chunk_timeout)

        request = _RING + U16.pack(len(tag)) + tag + _REQUEST.pack(me, 0.0)
        try:
            channel = await asyncio.wait_for(ring.run(open_next, request), timeout)
        except (PartFailed, TimeoutError) as e:
            if isinstance(e, TimeoutError):  # the suspect: the member before, if its stream never came
                if not ring.incoming.done():
                    stats.unreachable.add(peers[ring.prev].to_base58())
                stats.reason = f"ring all-reduce did not finish within {timeout:.0f}s"
            else:
                stats.reason = ring.error or str(e)
            return None, stats
        finally:
            self._rings.pop(tag, None)
        stats.held = True
        if endpoint is not None and channel.reusable:
            self._idle[endpoint, self.seal_key].append((channel, time.monotonic()))
        else:
            channel.close()
        return ring.out, stats

    async def broadcast(
        self,
        tag: bytes,
        peers: Sequence[PeerID],
        me: int,
        root: int,
        vector: torch.Tensor | None,
        *,
        numel: int,
        codec: Compressor,
        round: int,
        timeout: float,
        routes: Routes | None = None,
    ) -> tuple[torch.Tensor | None, ButterflyStats]:
        """The root's (numel,) vector on every member, through `codec` (the root decodes the same payload). The root
        passes its vector, the others None; a root that passes None fails the broadcast for everyone at once. Members
        pull from the root, so a member that can only dial out still gets it; the root must accept streams."""
        stats = ButterflyStats()
        if me != root:
            out = torch.empty(numel, dtype=codec.dtype)
            try:
                pull = self._exchange(
                    peers[root], tag, me, 0.0, None, out, codec=codec, round=round, stats=stats, wait=timeout,
                    routes=routes,
                )  # fmt: skip
                await asyncio.wait_for(pull, timeout)
                return out, stats
            except (TimeoutError, PartFailed, OSError) as e:
                stats.reason = str(e) or f"no broadcast within {timeout:.0f}s"
                return None, stats
        piece = self._slices.setdefault(tag, asyncio.get_running_loop().create_future())
        mine = Slice(peers=peers, senders=1, size=numel, codec=codec, round=round, stats=stats, replies=len(peers) - 1)
        if vector is None:
            mine.fail("the broadcast's root has no result to send")
        else:
            mine.add_all(0, 1.0, vector.reshape(-1))
        if not piece.done():
            piece.set_result(mine)
        try:
            if mine.error:
                stats.reason = mine.error
                return None, stats
            if len(peers) > 1:
                try:  # wait for the members to pull, so that their bytes count in this round
                    await asyncio.wait_for(mine.all_replied.wait(), timeout)
                except TimeoutError:
                    pass  # a member that never pulled fails its own round
            return mine.decode_into(torch.empty(numel, dtype=codec.dtype)), stats
        finally:
            self._slices.pop(tag, None)

    async def _own(self, mine: Slice, out: torch.Tensor) -> None:
        if out.numel() > 0:
            await mine.done.wait()
            mine.decode_into(out)

    async def _exchange(
        self,
        peer: PeerID,
        tag: bytes,
        me: int,
        weight: float,
        part: torch.Tensor | None,
        out: torch.Tensor,
        *,
        codec: Compressor,
        round: int,
        stats: ButterflyStats,
        wait: float = 0.0,
        routes: Routes | None = None,
        reply_codec: Compressor | None = None,
        check_replies: bool = False,
        on_piece: Callable[[int, bool], None] | None = None,
    ) -> None:
        """Send `part` to the member that reduces it and read the averaged part back into `out`; with part None, read
        the vector that member broadcasts into `out`. `check_replies`: an averaged piece that is not finite fails
        the exchange (a reducer that sends one must not reach the model). `on_piece(index, whole)`: a reply's piece
        began to arrive (whole False), and then arrived whole and usable (True)."""
        remote = peer.to_base58()
        endpoint = routes.get(peer) if routes else None
        try:
            channel = self._take_idle(endpoint)
            if channel is None:
                channel = await asyncio.wait_for(self._open(peer, endpoint), self.chunk_timeout)
        except Exception as e:
            raise PartFailed(f"could not open a stream to {remote[-6:]}: {e!r}") from None
        sizes = piece_sizes(out.numel())

        async def send() -> None:
            if part is None:
                request = _PULL + U16.pack(len(tag)) + tag + _REQUEST.pack(me, 0.0) + _WAIT.pack(wait)
                await channel.send(request)
                stats.add_sent(remote, len(request))
                return
            prefix = _MAGIC + U16.pack(len(tag)) + tag + _REQUEST.pack(me, weight)
            for index, piece in enumerate(part.split(sizes)):
                payload = codec.compress(piece, round=piece_round(round, index))
                stats.add_sent(remote, await write_payload(channel, prefix if index == 0 else b"", payload))

        async def receive() -> None:
            for index, dest in enumerate(out.split(sizes)):
                status = WAITING
                while status == WAITING:  # the reducer is there, waiting for other members' copies
                    status = (await channel.read_exactly(1))[0]
                    stats.bytes_received += 1
                if status != OK:
                    blob = await read_blob(channel, limit=1 << 16)
                    stats.bytes_received += 4 + len(blob)
                    reason = blob.decode(errors="replace")
                    if status == NOT_JOINED:  # this member itself is missing from the round
                        stats.not_joined.add(remote)
                        raise PartFailed(f"member {remote[-6:]}: {reason}")
                    raise ReducerFailed(f"reducer {remote[-6:]} failed: {reason}")
                if on_piece is not None:
                    on_piece(index, False)
                try:
                    _, n = await read_piece(
                        channel, reply_codec or codec, dest.numel(), piece_round(round, index), into=dest
                    )
                except ValueError as e:
                    raise PartFailed(f"bad reply from {remote[-6:]}: {e}") from None
                stats.bytes_received += n
                stats.held = True
                if check_replies and dest.is_floating_point() and not all_finite(dest):
                    raise PartFailed(f"reducer {remote[-6:]} sent back a mean that is not finite")
                if on_piece is not None:
                    on_piece(index, True)
                if self.on_reply is not None:
                    self.on_reply()

        sending = asyncio.ensure_future(send())  # replies to early pieces arrive while later ones still go out
        sending.add_done_callback(_retrieve)
        done = False
        try:
            await receive()
            await sending
            done = True
        finally:
            await _stop(sending)
            if done and endpoint is not None and channel.reusable:
                self._idle[endpoint, self.seal_key].append((channel, time.monotonic()))
            else:
                channel.close()

    def _take_idle(self, endpoint: tuple[str, int] | None) -> Channel | None:
        """A kept connection to `endpoint`, sealed as this peer seals now, still open and not idle for long, or None."""
        idle = self._idle.get((endpoint, self.seal_key)) if endpoint is not None else None
        while idle:
            channel, since = idle.pop()
            if time.monotonic() - since < KEEP_IDLE_S and channel.alive():
                channel.retime(self.chunk_timeout)
                return channel
            channel.close()
        return None

    async def _open(self, peer: PeerID, endpoint: tuple[str, int] | None) -> Channel:
        """A new channel to `peer`: a direct TCP connection to `endpoint`, or without one a libp2p stream."""
        if endpoint is not None:
            channel = await SocketChannel.connect(*endpoint, timeout=self.chunk_timeout)
            return channel if self.seal_key is None else await SealedChannel.dial(channel, self.seal_key)
        relay = self.via.get(peer)
        if relay is not None:
            reader, writer = await self.forwarder.open(relay, peer)
        else:
            _, reader, writer = await self.p2p.call_binary_stream_handler(peer, self.name)
        return StreamChannel(reader, writer, timeout=self.chunk_timeout)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # e.g. out of file descriptors: the senders time out and retry next round
                logger.warning("averaging.transport tcp: accept failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            handler = asyncio.ensure_future(self._handle_tcp(conn))
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)

    async def _handle_tcp(self, conn: socket.socket) -> None:
        """A direct TCP connection; with a seal key, one that does not open sealed is refused with one line."""
        channel: Channel = SocketChannel(conn, timeout=self.chunk_timeout)
        if self.seal_key is not None:
            try:
                host, port = conn.getpeername()[:2]
                where = f"{host}:{port}"
            except OSError:
                where = "a closed connection"
            try:
                if await channel.read_exactly(len(SEALED)) != SEALED:
                    raise PartFailed("it is not sealed (the sender has no privacy.swarm_key?)")
                channel = await SealedChannel.accept(channel, self.seal_key)
            except (PartFailed, OSError) as e:
                logger.warning("refused a direct TCP averaging connection from %s: %s", where, e)
                channel.close()
                return
        try:  # one exchange after another, while the sender keeps the connection (see _take_idle)
            while await self._handle(channel, keep=True) and await channel.wait_readable(2 * KEEP_IDLE_S):
                channel.retime(self.chunk_timeout)
        finally:
            channel.close()

    async def _handle_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._handle(StreamChannel(reader, writer, timeout=self.chunk_timeout), remote=info.peer_id)

    async def _handle_forwarded(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: PeerID
    ) -> None:
        await self._handle(StreamChannel(reader, writer, timeout=self.chunk_timeout), remote=source)

    async def _handle(self, channel: Channel, *, remote: PeerID | None = None, keep: bool = False) -> bool:
        """Serve one sender: read its part, add it to this peer's slice, reply with the slice's mean. `remote`: the
        peer libp2p authenticated for the stream (None on direct TCP), which must be a member of the group. `keep`:
        leave the channel open after a complete exchange, and say so (True), for the sender's next one."""
        done = False
        try:
            kind = await channel.read_exactly(4)
            if kind == SEALED:
                logger.warning("refused a sealed averaging connection: this peer has no privacy.swarm_key")
                return False
            if kind not in (_MAGIC, _PULL, _RING):
                return False  # not a p2pfed stream: drop it without a word
            (tag_len,) = U16.unpack(await channel.read_exactly(U16.size))
            tag = await channel.read_exactly(tag_len)
            # The sender may be ahead of this peer by the matchmaking lag and a busy machine's delays: this peer waits
            # up to twice a read's deadline for its own all-reduce to start, and says it is there meanwhile.
            wait = self.chunk_timeout * 2  # inside the round's deadline (chunk_timeout * 3), so the member is named
            sender, weight = _REQUEST.unpack(await channel.read_exactly(_REQUEST.size))
            if kind == _RING:
                done = await self._handle_ring(channel, tag, sender, wait, remote=remote)
                if done and not keep:
                    await channel.linger()  # as below: the sender waits for the last byte
                return done and keep
            if kind == _PULL:  # a puller says how long it waits: the root may first have a slow all-reduce of its own
                (wait,) = _WAIT.unpack(await channel.read_exactly(_WAIT.size))
                wait = min(max(wait, 0.0), _MAX_PULL_WAIT)
            piece = self._slices.setdefault(tag, asyncio.get_running_loop().create_future())
            try:
                mine = await self._when_started(channel, piece, wait)
            except TimeoutError:
                if not piece.done():
                    self._slices.pop(tag, None)
                raise NotJoined("this peer never started that all-reduce") from None
            if remote is not None and remote not in mine.peers:
                raise PartFailed(f"peer {remote.to_base58()[-6:]} is not a member of this all-reduce")
            reading: asyncio.Future[None] | None = None
            if kind == _PULL:
                mine.stats.bytes_received += 4 + U16.size + tag_len + _REQUEST.size + _WAIT.size
            else:
                if mine.error:
                    raise PartFailed(mine.error)
                if not (0 <= sender < mine.senders) or not weight >= 0.0:
                    raise PartFailed(f"bad request: sender {sender}, weight {weight}")
                mine.stats.bytes_received += 4 + U16.size + tag_len + _REQUEST.size
                reading = asyncio.ensure_future(self._read_parts(channel, mine, sender, weight))
                reading.add_done_callback(_retrieve)
            try:
                for index in range(len(mine.sizes)):  # each piece's mean goes back as soon as it is reduced
                    payload = await self._when_reduced(channel, mine, index)
                    sent = await write_payload(channel, U8.pack(OK), payload)
                    mine.stats.add_sent(mine.peers[sender].to_base58() if sender < len(mine.peers) else "?", sent)
                if reading is not None:
                    await reading
            finally:
                if reading is not None:
                    await _stop(reading)
            mine.replied += 1
            if mine.replied == mine.replies:
                mine.all_replied.set()
            done = True
            if not keep:
                await channel.linger()  # p2pd may drop a reply's last bytes when the reducer's end closes first
        except (TimeoutError, PartFailed, OSError, struct.error) as e:
            reason = str(e) or type(e).__name__
            if isinstance(e, Unsealed):  # bytes from a process without the swarm's key, or altered on the way
                logger.warning("refused a direct TCP averaging connection: %s", reason)
            else:
                logger.debug("part not reduced: %s", reason)
            try:
                blob = reason.encode()[: 1 << 16]
                status = NOT_JOINED if isinstance(e, NotJoined) else ERROR
                await channel.send(U8.pack(status) + U32.pack(len(blob)) + blob)
            except Exception:
                pass  # the sender is gone; its own read fails and it records the round as failed
        finally:
            if not (done and keep):
                channel.close()
        return done and keep

    async def _handle_ring(
        self, channel: Channel, tag: bytes, sender: int, wait: float, *, remote: PeerID | None
    ) -> bool:
        """Hand the stream from the member before this one to this peer's ring round once it has started; whether
        the round ended well. Raises NotJoined when it never starts."""
        future = self._rings.setdefault(tag, asyncio.get_running_loop().create_future())
        try:
            ring = await self._waiting(channel, lambda: asyncio.shield(future), wait)  # saying it is there
        except TimeoutError:
            if not future.done():
                self._rings.pop(tag, None)
            raise NotJoined("this peer never started that ring all-reduce") from None
        if remote is not None and remote not in ring.peers:
            raise PartFailed(f"peer {remote.to_base58()[-6:]} is not a member of this all-reduce")
        return await ring.take(channel, sender)

    async def _when_started(self, channel: Channel, piece: asyncio.Future[Slice], wait: float) -> Slice:
        """This peer's slice of the all-reduce once it has started it, within `wait` seconds (TimeoutError)."""
        return await self._waiting(channel, lambda: asyncio.shield(piece), wait)

    async def _when_reduced(self, channel: Channel, mine: Slice, index: int) -> Payload:
        """Piece `index`'s mean once every member's copy is in, within chunk_timeout * 3 (TimeoutError)."""
        while self.hold_replies:
            await asyncio.sleep(self.chunk_timeout / 3)
            await channel.send(U8.pack(WAITING))
        return await self._waiting(channel, lambda: mine.piece(index), self.chunk_timeout * 3)

    async def _waiting(self, channel: Channel, ready: Callable[[], Awaitable[_T]], seconds: float) -> _T:
        """What `ready()` gives, within `seconds` (TimeoutError); meanwhile a waiting status every chunk_timeout / 3,
        which tells the sender that this peer is there, so it does not take it for a silent one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            try:
                return await asyncio.wait_for(ready(), min(self.chunk_timeout / 3, deadline - loop.time()))
            except TimeoutError:
                if loop.time() >= deadline:
                    raise
            await channel.send(U8.pack(WAITING))

    async def _read_parts(self, channel: Channel, mine: Slice, sender: int, weight: float) -> None:
        """Read one sender's part piece by piece into the slice; a piece that does not arrive whole fails the slice
        for every sender (the round must not commit without it)."""
        try:
            for index, size in enumerate(mine.sizes):
                try:
                    piece, n = await read_piece(channel, mine.codec, size, piece_round(mine.round, index))
                except ValueError as e:
                    raise PartFailed(f"bad part from member {sender}: {e}") from None
                mine.stats.bytes_received += n
                mine.add(sender, index, weight, piece, owned=True)  # decoded from (or read into) a fresh buffer
        except (TimeoutError, PartFailed, OSError, struct.error) as e:
            mine.fail(f"member {sender}'s part: {e}")
            if sender < len(mine.peers):
                mine.stats.unreachable.add(mine.peers[sender].to_base58())
            raise PartFailed(mine.error) from None


async def _failing_slice(mine: Slice, peer: PeerID, exchange: Awaitable[None]) -> None:
    """An exchange with reducer `peer`; when that member is gone (no stream, a stream cut, silence), this member's
    own slice fails at once too: the gone member's part will not come, and the other senders hear so now rather than
    when the round's deadline passes. A reducer that answered with an error is there, and fails nothing else."""
    try:
        await exchange
    except (PartFailed, OSError, TimeoutError) as e:
        if _gone(e):
            mine.fail(f"member {peer.to_base58()[-6:]} is gone: {e}")
        raise


def _gone(outcome: object) -> bool:
    """Whether an exchange's outcome says its member is gone (no stream, a stream cut, silence). A reducer that
    answered with an error is there: the culprit is elsewhere."""
    return isinstance(outcome, PartFailed | OSError | TimeoutError) and not isinstance(outcome, ReducerFailed)


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel a helper task and wait until it has let go of its channel, so the channel can close under no one."""
    if not task.done():
        task.cancel()
        await asyncio.wait([task])


def _record(got: dict[tuple[int, int], bool], reducer: int, index: int, whole: bool) -> None:
    got[reducer, index] = whole


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a helper task's exception as seen: the coroutine that awaits the other half reports the failure."""
    if not task.cancelled():
        task.exception()
