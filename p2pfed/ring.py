"""A ring all-reduce: each member sends only to the next one, so every link carries one flow at a time.

    out, stats = await butterfly.ring_allreduce(tag, peers, me, vector, weight=w, codec=Fp32(), round=r, timeout=30)

(averaging.schedule: ring.) The vector is cut into one chunk per member. Reduce-scatter: at step s = 0 .. n-2,
member i sends chunk (i - s) mod n to member i + 1: its own copy at s = 0, then the running mean it got from member
i - 1 with its own copy folded in. After n - 1 steps member i holds the group's weighted mean of chunk (i + 1) mod n;
it compresses that once, and the all-gather carries the payload around the ring as it came, so every member ends
with the same values. Each member sends 2 (n - 1) / n of the vector, as in the butterfly; chunks travel in pieces of
256K elements (PIECE), each passed on as soon as it is in.

Why: on links shaped per peer, the butterfly's every-to-every flows meet two at a time in each downlink's queue, and
raw TCP in that pattern gets about 0.85 of the rate with three peers; one flow per link gets 0.93 (docs/BENCHMARKS.md,
B2). What it gives up: a member sees running means, not the others' copies, so nobody screens another member's update
(robust aggregation rules need the butterfly); each member screens its own update (finite, under the norm bound) and
contributes nothing when it fails, and a mean that is not finite fails the round. A lossy codec quantizes each
running mean once per hop (n - 1 times) and the mean once more; the mean travels unchanged.

When a member fails (its stream from the member before breaks, the next member is gone or never started the round),
it tells the next member in the stream, between frames, and the member before in its answer, which members it found
gone or never joined; each member that hears it passes it on. So every survivor names the same missing members, and
the members left can re-form the round without them (p2pfed/phases.py), as with the butterfly. What a member hears
is taken on trust, as is everything in a ring.

Wire format, after the request (magic "P2PR", tag length u16, tag, sender index u16, weight f64 ignored): one frame per
piece, reduce-scatter steps first, then all-gather steps: status u8 OK, the weight folded into the running mean so far
f64, then a payload (p2pfed/wire.py). Between frames the sender may write WAITING (it waits for the member before
it; one every chunk_timeout / 3 at least) or, to end the stream, ERROR and a JSON body (reason, gone, not_joined: the
members' base58 ids; u32 length first). The receiver answers on the same connection: WAITING while its round runs,
then OK once every frame is in (the sender may then use the connection again), or ERROR and a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence

import torch
from hivemind.p2p import PeerID

from p2pfed.channel import Channel
from p2pfed.compression import Compressor, Payload
from p2pfed.pieces import ButterflyStats, PartFailed, ReducerFailed, piece_round, piece_sizes
from p2pfed.robust import Guard, all_finite
from p2pfed.wire import ERROR, NOT_JOINED, OK, U8, U32, WAITING, read_blob, read_payload, read_piece, write_payload

__all__ = ["RingRound"]

logger = logging.getLogger(__name__)

# Elements per frame. Each member passes a piece on only once it is in whole, and every step of the ring waits on the
# step before it at the member before, so a piece's time on the link and in the codec is what a step boundary costs:
# 8-bit rounds on a 100 Mbit/s link got 0.87-0.88 of the rate with pieces of 1M elements, 0.90-0.92 with 256K.
PIECE = 1 << 18
_WEIGHT = struct.Struct("<d")
# what the sender writes next: a prefix, then a payload (None: prefix only), or what makes it when the frame is due
_Frame = tuple[bytes, Payload | Callable[[], Payload] | None]


class Upstream(ReducerFailed):
    """A member before this one in the ring failed and said so: the member that sent it is there."""


class RingRound:
    """This member's part of one ring all-reduce. `run` does the round; the connection from the member before it
    arrives through `take` (Butterfly's stream handler)."""

    def __init__(
        self,
        *,
        peers: Sequence[PeerID],
        me: int,
        vector: torch.Tensor,
        weight: float,
        codec: Compressor,
        round: int,
        stats: ButterflyStats,
        chunk_timeout: float,
        guard: Guard | None = None,
        on_reply: Callable[[], None] | None = None,
    ) -> None:
        """`vector`: (numel,) fp32, this member's update. `guard`: this member's own update, when not finite or over
        the guard's norm bound, joins the round with weight 0 (the others' mean goes on without it). `on_reply` (a
        test aid): called as each piece of another member's mean arrives."""
        self.peers, self.me, self.codec, self.round, self.stats = peers, me, codec, round, stats
        self.n = len(peers)
        self.prev, self.next = (me - 1) % self.n, (me + 1) % self.n
        self.chunk_timeout, self.on_reply = chunk_timeout, on_reply
        self.weight = float(weight)
        reason = (guard or Guard()).check(vector)
        if reason:
            self.weight = 0.0
            stats.dropped.append(f"this member's own update ({reason})")
        self.sizes = _equal_sizes(vector.numel(), self.n)
        self.chunks = list(vector.split(self.sizes))
        self.out = torch.empty(vector.numel(), dtype=torch.float32)
        self.outs = list(self.out.split(self.sizes))
        self.incoming: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        self.outgoing: Channel | None = None  # to the next member, once open
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.error = ""
        self._frames: asyncio.Queue[_Frame] = asyncio.Queue()
        self._frame_in = 0  # frames read so far: with the sender's index, seeds a lossy codec's rounding per frame
        self._frame_out = 0
        self._writing = False  # the sender is inside a frame
        self._stopping = False  # the round failed: the sender ends after the frame it is writing

    async def take(self, channel: Channel, sender: int) -> bool:
        """Serve the connection from the member before this one until the round is over, and answer on it: a waiting
        status every chunk_timeout / 3 meanwhile (this member is there), then OK once all of it is in, or ERROR with
        what this member knows of who is missing. Whether the round ended well (the channel may then carry the
        sender's next exchange)."""
        if sender != self.prev:
            raise PartFailed(f"member {sender} sent a ring part; this member takes them from member {self.prev}")
        if self.incoming.done():
            raise PartFailed(f"a second ring connection from member {sender}")
        self.incoming.set_result(channel)
        while not self.finished.done():
            try:
                async with asyncio.timeout(self.chunk_timeout / 3):
                    await asyncio.shield(self.finished)
            except TimeoutError:
                await channel.send(U8.pack(WAITING))
        ok = self.finished.result()
        await channel.send(U8.pack(OK) if ok else self._error_frame())
        if not ok:  # the member before must read that before the connection goes
            channel.end_writes()
            await channel.drain(self.chunk_timeout / 3)
        return ok

    async def run(self, open_next: Callable[[], Awaitable[Channel]], request: bytes) -> Channel:
        """The round: the mean lands in `self.out`. `open_next` gives a channel to the next member, on which `request`
        goes first; it is returned when the round ended well, for the caller to keep. A failure raises PartFailed
        (its suspects in stats.unreachable) after telling the next member why, when it can."""
        remote = self.peers[self.next].to_base58()
        for piece in self._pieces(self.me):  # step 0: this member's own copy
            self._put(piece if self.weight > 0 else torch.zeros_like(piece), self.weight)
        outgoing: Channel | None = None
        sending: asyncio.Future[None] | None = None
        listening: asyncio.Future[None] | None = None
        receiving = asyncio.ensure_future(self._receive())
        try:
            try:
                outgoing = self.outgoing = await open_next()
            except Exception as e:
                raise _Gone(self.next, f"could not open a stream to {remote[-6:]}: {e!r}") from None
            await outgoing.send(request)
            self.stats.add_sent(remote, len(request))
            sending = asyncio.ensure_future(self._send(outgoing, remote))
            listening = asyncio.ensure_future(self._listen(outgoing))
            for task in asyncio.as_completed([sending, receiving, listening]):
                await task  # the first failure of any side ends the round
            return outgoing
        except BaseException as e:
            self._fail(e)
            logger.debug("member %d: ring round failed: %s", self.me, self.error)
            await _stop(receiving)  # first: take() then reads the same connection (one reader at a time)
            if not self.finished.done():
                self.finished.set_result(False)  # take() answers the member before with what this one knows
            if sending is not None and not sending.done() and self._writing:  # let the frame on the wire end whole
                self._stopping = True
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(self.chunk_timeout):
                        await asyncio.shield(sending)
            between = not self._writing
            await _stop(sending)
            await _stop(listening)
            if outgoing is not None:
                if between and not _from_next(e, self.next):  # mid-payload, a status would be read as data
                    await self._tell(outgoing)
                    outgoing.end_writes()
                    await outgoing.drain(self.chunk_timeout / 3)
                outgoing.close()
            raise
        finally:
            await _stop(receiving)
            if not self.finished.done():
                self.finished.set_result(False)

    def _fail(self, e: BaseException) -> None:
        if isinstance(e, _Gone):
            self.stats.unreachable.add(self.peers[e.member].to_base58())
        self.error = self.error or str(e) or "the ring round ended"

    async def _receive(self) -> None:
        """Read the member before this one's frames: fold this member's copy into each running mean and pass it on;
        keep the means that come around, and pass those on too, but for the last one (the next member's own)."""
        try:
            # longer than the member before waits for this one (2 * chunk_timeout, Butterfly._handle_ring): when this
            # member is the missing one's next, the one before the missing one hears first that it never started
            async with asyncio.timeout(3 * self.chunk_timeout):
                channel = await asyncio.shield(self.incoming)
        except TimeoutError:
            raise _Gone(self.prev, f"member {self.prev} never sent its ring part") from None
        try:
            for step in range(self.n - 1):  # reduce-scatter: running means of chunk (me - 1 - step)
                chunk = (self.me - 1 - step) % self.n
                for index, own in enumerate(self._pieces(chunk)):
                    weight = await self._status(channel)
                    got, _ = await self._read(channel, own.numel())
                    total = weight + self.weight
                    if weight <= 0 < self.weight:  # nothing folded in before: the mean is this member's copy
                        got.copy_(own)
                    elif weight <= 0:  # nor here: the running mean stays empty
                        got.zero_()
                    elif self.weight > 0:  # the running mean with this member's copy folded in, in one pass
                        got.lerp_(own, self.weight / total)
                    if step < self.n - 2:
                        self._put(got, total)
                        continue
                    if total <= 0:
                        raise _Refused("every member's own update failed its check")
                    self._finish(chunk, index, got, total)
            for step in range(self.n - 1):  # all-gather: the means of chunk (me - step), each as its reducer sent it
                chunk = (self.me - step) % self.n
                for dest in self._pieces(chunk, self.outs):
                    total = await self._status(channel)
                    payload = await self._read_into(channel, dest)
                    if not all_finite(dest):
                        raise _Refused(f"the mean of chunk {chunk} is not finite")
                    if self.on_reply is not None:
                        self.on_reply()
                    if step < self.n - 2:
                        self._frames.put_nowait((_status_ok(total), payload))
            self.finished.set_result(True)  # take() says so to the member before
        except (TimeoutError, OSError, struct.error, PartFailed) as e:
            if isinstance(e, ReducerFailed | _Gone):
                raise
            raise _Gone(self.prev, f"member {self.prev}'s ring part: {e}") from None

    def _finish(self, chunk: int, index: int, mean: torch.Tensor, total: float) -> None:
        """The group's mean of one piece of this member's chunk: compressed once, kept as decoded, sent around."""
        payload = self.codec.compress(mean, round=self._rounding(self.me, self._frame_out))
        dest = self._pieces(chunk, self.outs)[index]
        if self.codec.raw:
            dest.copy_(mean)
        else:
            dest.copy_(self.codec.decompress(payload, numel=dest.numel(), round=0))
        if not all_finite(dest):
            raise _Refused(f"the mean of chunk {chunk} is not finite")
        self._frames.put_nowait((_status_ok(total), payload))
        self._frame_out += 1

    def _put(self, values: torch.Tensor, weight: float) -> None:
        """Queue a running mean, under the frame's own rounding seed; it is compressed when its turn on the wire comes,
        so the first bytes leave before the rest of a chunk is compressed."""
        compress = functools.partial(self.codec.compress, values, round=self._rounding(self.me, self._frame_out))
        self._frames.put_nowait((_status_ok(weight), compress))
        self._frame_out += 1

    async def _send(self, channel: Channel, remote: str) -> None:
        """Write the queued frames to the next member; while none is ready, a waiting status every chunk_timeout / 3
        (this member is there, waiting for the one before it)."""
        try:
            left = sum(len(self._pieces(chunk)) for chunk in self._sent_chunks())
            while left and not self._stopping:  # no waiting status after the last frame: nobody reads it
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that comes as the
                    # queue hands over a frame, and the round's end would wait on a sender that goes on
                    async with asyncio.timeout(self.chunk_timeout / 3):
                        prefix, payload = await self._frames.get()
                    left -= 1
                except TimeoutError:
                    prefix, payload = U8.pack(WAITING), None
                self._writing = True
                if payload is None:
                    await channel.send(prefix)
                    sent = len(prefix)
                else:
                    sent = await write_payload(channel, prefix, payload if isinstance(payload, Payload) else payload())
                self._writing = False
                self.stats.add_sent(remote, sent)
        except (TimeoutError, OSError, PartFailed) as e:
            raise _Gone(self.next, f"member {self.next} took no more of the ring: {e}") from None

    async def _listen(self, channel: Channel) -> None:
        """The next member's answers: waiting statuses while its round runs, then OK (it has read all of this
        member's frames), NOT_JOINED (it never started the round: it is the one missing) or ERROR (what it knows)."""
        try:
            while (status := (await channel.read_exactly(1))[0]) == WAITING:
                self.stats.bytes_received += 1
            self.stats.bytes_received += 1
            if status == OK:
                return
            blob = await read_blob(channel, limit=1 << 16)
        except (TimeoutError, OSError, struct.error, PartFailed) as e:
            raise _Gone(self.next, f"member {self.next} went silent: {e}") from None
        if status == NOT_JOINED:
            self.stats.not_joined.add(self.peers[self.next].to_base58())
            raise _Gone(self.next, f"member {self.next}: {blob.decode(errors='replace')}")
        raise _NextFailed(f"member {self.next} failed: {self._heard(blob)}")

    async def _status(self, channel: Channel) -> float:
        """A frame's status; its running weight when OK, else the upstream member's reason as Upstream."""
        while (status := (await channel.read_exactly(1))[0]) == WAITING:
            self.stats.bytes_received += 1
        self.stats.bytes_received += 1
        if status != OK:
            raise Upstream(f"member {self.prev} failed: {self._heard(await read_blob(channel, limit=1 << 16))}")
        (weight,) = _WEIGHT.unpack(await channel.read_exactly(_WEIGHT.size))
        self.stats.bytes_received += _WEIGHT.size
        if not weight >= 0.0:
            raise _Refused(f"member {self.prev} sent a running weight of {weight}")
        return weight

    async def _read(self, channel: Channel, size: int) -> tuple[torch.Tensor, int]:
        try:
            got, n = await read_piece(channel, self.codec, size, self._rounding(self.prev, self._frame_in))
        except ValueError as e:
            raise _Refused(f"bad ring part from member {self.prev}: {e}") from None
        self._frame_in += 1
        self.stats.bytes_received += n
        return got, n

    async def _read_into(self, channel: Channel, dest: torch.Tensor) -> Payload:
        try:
            payload, landed, n = await read_payload(channel, self.codec, dest.numel(), into=dest)
            if not landed:
                dest.copy_(self.codec.decompress(payload, numel=dest.numel(), round=0))
        except ValueError as e:
            raise _Refused(f"bad ring mean from member {self.prev}: {e}") from None
        self._frame_in += 1
        self.stats.bytes_received += n
        return payload

    async def _tell(self, channel: Channel) -> None:
        """Say why this round failed to the next member, between frames (best effort: it may be gone)."""
        try:
            async with asyncio.timeout(1.0):
                await channel.send(self._error_frame())
        except Exception:
            pass

    def _error_frame(self) -> bytes:
        """ERROR, then this member's reason and the members it found gone or never joined, so that every member of
        the ring names the same ones (a re-formed round leaves out exactly those: p2pfed/phases.py)."""
        said = {
            "reason": self.error,
            "gone": sorted(self.stats.unreachable),
            "not_joined": sorted(self.stats.not_joined),
        }
        blob = json.dumps(said).encode()[: 1 << 16]
        return U8.pack(ERROR) + U32.pack(len(blob)) + blob

    def _heard(self, blob: bytes) -> str:
        """Take in another member's error frame (the group's members it names, nobody else); its reason."""
        try:
            said = json.loads(blob)
            members = {peer.to_base58() for peer in self.peers}
            self.stats.unreachable |= members & set(said.get("gone", ()))
            self.stats.not_joined |= members & set(said.get("not_joined", ()))
            return str(said.get("reason", ""))
        except (ValueError, TypeError, AttributeError):
            return blob.decode(errors="replace")

    def _sent_chunks(self) -> list[int]:
        """The chunks this member sends, in order: reduce-scatter steps, then all-gather steps."""
        n = self.n
        return [(self.me - s) % n for s in range(n - 1)] + [(self.me + 1 - s) % n for s in range(n - 1)]

    def _pieces(self, chunk: int, of: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return list((of or self.chunks)[chunk].split(piece_sizes(self.sizes[chunk], PIECE)))

    def _rounding(self, member: int, frame: int) -> int:
        """A lossy codec's rounding seed for one frame of one member's stream: distinct across members and frames."""
        return piece_round(self.round, frame * self.n + member)


class _Refused(ReducerFailed):
    """What came is unusable (a mean that is not finite, a malformed frame): the round fails, nobody is gone."""


class _NextFailed(ReducerFailed):
    """The next member answered the round with an error: it is there."""


class _Gone(PartFailed):
    """The member at index `member` is gone (no stream, a stream cut, silence)."""

    def __init__(self, member: int, reason: str) -> None:
        super().__init__(reason)
        self.member = member


def _from_next(e: BaseException, next: int) -> bool:
    """Whether a failure came from the next member itself (gone, or it said so): nothing to tell it."""
    return isinstance(e, _NextFailed) or (isinstance(e, _Gone) and e.member == next)


async def _stop(task: asyncio.Future[None] | None) -> None:
    """Cancel a helper task and wait until it lets go of its channel; its failure, if any, is the round's already."""
    if task is None:
        return
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # seen: the round reports the first failure


def _status_ok(weight: float) -> bytes:
    return U8.pack(OK) + _WEIGHT.pack(weight)


def _equal_sizes(numel: int, n: int) -> list[int]:
    base, extra = divmod(numel, n)
    return [base + (1 if i < extra else 0) for i in range(n)]
