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
piece: status u8 (0 ok, 1 error), then a payload (ok) or a UTF-8 reason (error), u32 length first. A
payload is its header-int count u8, the int32 header ints, the data length u64, and the data. Bytes are counted on
the wire in both directions, per remote peer.

Why not hivemind's AllReduceRunner: it wraps every chunk in protobuf messages, tolerates missing members by keeping
a peer's own values, and its compression is fixed to hivemind's codecs (see docs/BENCHMARKS.md, B1).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from p2pfed.compression import Compressor, Payload
from p2pfed.pieces import ButterflyStats, PartFailed, Slice, piece_round, piece_sizes

__all__ = ["Butterfly", "ButterflyStats", "Routes", "split_sizes"]

Routes = Mapping[PeerID, tuple[str, int]]  # members' direct TCP endpoints (host, port)

logger = logging.getLogger(__name__)

_MAGIC = b"P2PF"  # a part for the reducer
_PULL = b"P2PB"  # a request for a broadcast's vector
_REQUEST = struct.Struct("<Hd")  # sender index, weight
_WAIT = struct.Struct("<d")  # seconds a puller waits for the root
_MAX_PULL_WAIT = 600.0
_U8, _U16, _U32, _U64 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_IO_CHUNK = 1 << 20  # bytes per write/read call; each read has its own deadline
_MAX_PAYLOAD = 1 << 36  # a header claiming more than 64 GiB is not from a p2pfed peer


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

    def __init__(self, p2p: P2P, *, name: str, chunk_timeout: float = 10.0) -> None:
        self.p2p, self.name, self.chunk_timeout = p2p, name, chunk_timeout
        self._slices: dict[bytes, asyncio.Future[Slice]] = {}
        self._tcp: asyncio.AbstractServer | None = None

    async def serve(self) -> None:
        await self.p2p.add_binary_stream_handler(self.name, self._handle)

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Also accept parts on a listening TCP socket (averaging.transport=tcp): no libp2p daemon in the path."""
        self._tcp = await asyncio.start_server(lambda r, w: self._handle(None, r, w), sock=sock)

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
    ) -> tuple[torch.Tensor | None, ButterflyStats]:
        """The group's weighted mean of `vector` (flat fp32), or None with the reason in stats when any part failed.

        `tag` names this all-reduce on every member (group id plus a phase), `round` seeds the codec's randomness.
        `routes` maps members to direct TCP endpoints; members without one are reached over libp2p.
        """
        stats = ButterflyStats()
        sizes = split_sizes(vector.numel(), shares)
        parts = list(vector.split(sizes))
        piece = self._slices.setdefault(tag, asyncio.get_running_loop().create_future())
        mine = Slice(peers=peers, senders=len(peers), size=sizes[me], codec=codec, round=round, stats=stats)
        if sizes[me] > 0:
            if not piece.done():
                piece.set_result(mine)
            mine.add_all(me, weight, parts[me])
        else:
            mine.fail("this member reduces no part")
        try:
            exchanges = [
                self._exchange(
                    peers[j], tag, me, weight, parts[j], codec=codec, round=round, stats=stats, routes=routes
                )
                if j != me and sizes[j] > 0
                else self._own(mine, sizes[j])
                for j in range(len(peers))
            ]
            gathering = asyncio.gather(*exchanges, return_exceptions=True)
            gathering.add_done_callback(_retrieve)  # a cancelled round must not log "exception never retrieved"
            results = await asyncio.wait_for(gathering, timeout)
        except asyncio.TimeoutError:
            results = [PartFailed(f"all-reduce did not finish within {timeout:.0f}s")]
        finally:
            mine.fail("the all-reduce ended")  # a sender still waiting on this peer's slice gets a clear reply
            self._slices.pop(tag, None)
        if sizes[me] > 0 and not mine.error and len(peers) > 1:
            try:  # the round's byte count includes the replies this peer's slice still has to write
                await asyncio.wait_for(mine.all_replied.wait(), self.chunk_timeout)
            except asyncio.TimeoutError:
                pass  # a sender that stopped reading only shortens the count
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            unexpected = [f for f in failures if not isinstance(f, PartFailed | OSError | asyncio.TimeoutError)]
            if unexpected:
                raise unexpected[0]
            stats.reason = str(failures[0]) or type(failures[0]).__name__
            return None, stats
        return torch.cat([r for r in results if isinstance(r, torch.Tensor)]), stats

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
            try:
                pull = self._exchange(
                    peers[root], tag, me, 0.0, None, codec=codec, round=round, stats=stats, numel=numel, wait=timeout,
                    routes=routes,
                )  # fmt: skip
                return await asyncio.wait_for(pull, timeout), stats
            except (PartFailed, OSError, asyncio.TimeoutError) as e:
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
                except asyncio.TimeoutError:
                    pass  # a member that never pulled fails its own round
            return mine.decoded(), stats
        finally:
            self._slices.pop(tag, None)

    async def _own(self, mine: Slice, size: int) -> torch.Tensor:
        if size == 0:
            return torch.zeros(0)
        await mine.done.wait()
        return mine.decoded()

    async def _exchange(
        self,
        peer: PeerID,
        tag: bytes,
        me: int,
        weight: float,
        part: torch.Tensor | None,
        *,
        codec: Compressor,
        round: int,
        stats: ButterflyStats,
        numel: int = 0,
        wait: float = 0.0,
        routes: Routes | None = None,
    ) -> torch.Tensor:
        """Send `part` to the member that reduces it and read back the averaged part; with part None, read back the
        `numel` elements that member broadcasts."""
        remote = peer.to_base58()
        try:
            reader, writer = await asyncio.wait_for(self._open(peer, routes), self.chunk_timeout)
        except Exception as e:
            raise PartFailed(f"could not open a stream to {remote[-6:]}: {e!r}") from None
        sizes = piece_sizes(numel if part is None else part.numel())

        async def send() -> None:
            if part is None:
                request = _PULL + _U16.pack(len(tag)) + tag + _REQUEST.pack(me, 0.0) + _WAIT.pack(wait)
                writer.write(request)
                await asyncio.wait_for(writer.drain(), self.chunk_timeout)
                stats.add_sent(remote, len(request))
                return
            prefix = _MAGIC + _U16.pack(len(tag)) + tag + _REQUEST.pack(me, weight)
            for index, piece in enumerate(part.split(sizes)):
                payload = codec.compress(piece, round=piece_round(round, index))
                stats.add_sent(remote, await self._write(writer, prefix if index == 0 else b"", payload))

        async def receive() -> torch.Tensor:
            pieces = []
            for index, size in enumerate(sizes):
                status = (await self._read(reader, 1))[0]
                if status != 0:
                    stats.bytes_received += 1
                    reason = await self._read_blob(reader, limit=1 << 16)
                    stats.bytes_received += 4 + len(reason)
                    raise PartFailed(f"reducer {remote[-6:]} failed: {reason.decode(errors='replace')}")
                payload, n = await self._read_payload(reader)
                stats.bytes_received += 1 + n
                try:
                    pieces.append(codec.decompress(payload, numel=size, round=piece_round(round, index)))
                except ValueError as e:
                    raise PartFailed(f"bad reply from {remote[-6:]}: {e}") from None
            return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

        sending = asyncio.ensure_future(send())  # replies to early pieces arrive while later ones still go out
        sending.add_done_callback(_retrieve)
        try:
            result = await receive()
            await sending
            return result
        finally:
            sending.cancel()
            writer.close()

    async def _open(self, peer: PeerID, routes: Routes | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        endpoint = routes.get(peer) if routes else None
        if endpoint is not None:
            return await asyncio.open_connection(*endpoint)
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer, self.name)
        return reader, writer

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one sender: read its part, add it to this peer's slice, reply with the slice's mean."""
        try:
            kind = await self._read(reader, 4)
            if kind not in (_MAGIC, _PULL):
                return  # not a p2pfed stream: drop it without a word
            (tag_len,) = _U16.unpack(await self._read(reader, _U16.size))
            tag = await self._read(reader, tag_len)
            wait = self.chunk_timeout  # the sender may be ahead of this peer by up to the matchmaking lag
            sender, weight = _REQUEST.unpack(await self._read(reader, _REQUEST.size))
            if (
                kind == _PULL
            ):  # a puller says how long it will wait: the root may first have a slow all-reduce of its own
                (wait,) = _WAIT.unpack(await self._read(reader, _WAIT.size))
                wait = min(max(wait, 0.0), _MAX_PULL_WAIT)
            piece = self._slices.setdefault(tag, asyncio.get_running_loop().create_future())
            try:
                mine = await asyncio.wait_for(asyncio.shield(piece), wait)
            except asyncio.TimeoutError:
                if not piece.done():
                    self._slices.pop(tag, None)
                raise PartFailed("this peer never started that all-reduce") from None
            reading: asyncio.Future[None] | None = None
            if kind == _PULL:
                mine.stats.bytes_received += 4 + _U16.size + tag_len + _REQUEST.size + _WAIT.size
            else:
                if mine.error:
                    raise PartFailed(mine.error)
                if not (0 <= sender < mine.senders) or not weight >= 0.0:
                    raise PartFailed(f"bad request: sender {sender}, weight {weight}")
                mine.stats.bytes_received += 4 + _U16.size + tag_len + _REQUEST.size
                reading = asyncio.ensure_future(self._read_parts(reader, mine, sender, weight))
                reading.add_done_callback(_retrieve)
            try:
                for index in range(len(mine.sizes)):  # each piece's mean goes back as soon as it is reduced
                    payload = await asyncio.wait_for(mine.piece(index), self.chunk_timeout * 3)
                    sent = await self._write(writer, b"\x00", payload)
                    mine.stats.add_sent(mine.peers[sender].to_base58() if sender < len(mine.peers) else "?", sent)
                if reading is not None:
                    await reading
            finally:
                if reading is not None:
                    reading.cancel()
            mine.replied += 1
            if mine.replied == mine.replies:
                mine.all_replied.set()
            await self._linger(reader)
        except (PartFailed, asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, struct.error) as e:
            reason = str(e) or type(e).__name__
            logger.debug("part not reduced: %s", reason)
            try:
                blob = reason.encode()[: 1 << 16]
                writer.write(b"\x01" + _U32.pack(len(blob)) + blob)
                await asyncio.wait_for(writer.drain(), self.chunk_timeout)
            except Exception:
                pass  # the sender is gone; its own read fails and it records the round as failed
        finally:
            writer.close()

    async def _read_parts(self, reader: asyncio.StreamReader, mine: Slice, sender: int, weight: float) -> None:
        """Read one sender's part piece by piece into the slice; a piece that does not arrive whole fails the slice
        for every sender (the round must not commit without it)."""
        try:
            for index, size in enumerate(mine.sizes):
                payload, n = await self._read_payload(reader)
                mine.stats.bytes_received += n
                try:
                    piece = mine.codec.decompress(payload, numel=size, round=piece_round(mine.round, index))
                except ValueError as e:
                    raise PartFailed(f"bad part from member {sender}: {e}") from None
                mine.add(sender, index, weight, piece)
        except (PartFailed, asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, struct.error) as e:
            mine.fail(f"member {sender}'s part: {e}")
            raise PartFailed(mine.error) from None

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """Keep the stream open until the other side closes it: p2pd may reset a stream whose local end closes
        while the remote end still reads, and the reset can discard the reply's last bytes in flight."""
        try:
            await asyncio.wait_for(reader.read(1), self.chunk_timeout)
        except (asyncio.TimeoutError, OSError):
            pass

    async def _write(self, writer: asyncio.StreamWriter, prefix: bytes, payload: Payload) -> int:
        header = _U8.pack(len(payload.header)) + struct.pack(f"<{len(payload.header)}i", *payload.header)
        head = prefix + header + _U64.pack(len(payload.data))
        writer.write(head)
        view = memoryview(payload.data)
        for start in range(0, len(view), _IO_CHUNK):
            writer.write(view[start : start + _IO_CHUNK])
            await asyncio.wait_for(writer.drain(), self.chunk_timeout)
        await asyncio.wait_for(writer.drain(), self.chunk_timeout)
        return len(head) + len(view)

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        try:
            return await asyncio.wait_for(reader.readexactly(n), self.chunk_timeout)
        except asyncio.IncompleteReadError:
            raise PartFailed("the stream closed early") from None
        except asyncio.TimeoutError:
            raise PartFailed(f"no data for {self.chunk_timeout:.0f}s") from None

    async def _read_blob(self, reader: asyncio.StreamReader, *, limit: int) -> bytes:
        (n,) = _U32.unpack(await self._read(reader, _U32.size))
        if n > limit:
            raise PartFailed(f"a message of {n} bytes is over the limit of {limit}")
        return await self._read(reader, n)

    async def _read_payload(self, reader: asyncio.StreamReader) -> tuple[Payload, int]:
        """A payload and its size on the wire. Large data arrives in chunks, each within chunk_timeout."""
        (count,) = _U8.unpack(await self._read(reader, 1))
        header = struct.unpack(f"<{count}i", await self._read(reader, 4 * count))
        (n,) = _U64.unpack(await self._read(reader, _U64.size))
        if n > _MAX_PAYLOAD:
            raise PartFailed(f"a payload of {n} bytes is over the limit")
        data = bytearray(n)
        view, pos = memoryview(data), 0
        while pos < n:
            chunk = await self._read_some(reader, min(_IO_CHUNK, n - pos))
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return Payload(data, tuple(header)), 1 + 4 * count + _U64.size + n

    async def _read_some(self, reader: asyncio.StreamReader, n: int) -> bytes:
        try:
            chunk = await asyncio.wait_for(reader.read(n), self.chunk_timeout)
        except asyncio.TimeoutError:
            raise PartFailed(f"no data for {self.chunk_timeout:.0f}s") from None
        if not chunk:
            raise PartFailed("the stream closed early")
        return chunk


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a helper task's exception as seen: the coroutine that awaits the other half reports the failure."""
    if not task.cancelled():
        task.exception()
