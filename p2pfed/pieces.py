"""A reducer's slice of one all-reduce, reduced piece by piece, and what an all-reduce reports.

    mine = Slice(peers=peers, senders=3, size=n, codec=Fp32(), round=r, stats=ButterflyStats())
    mine.add_all(me, weight, my_part)              # this peer's own copy
    mine.add(sender, index, weight, piece)         # a piece from another member, as it arrives
    payload = await mine.piece(index)              # that piece's mean, compressed once, for every sender

A part is cut into pieces of at most PIECE elements; a piece's mean is ready the moment every member's copy of it
has arrived, so a reducer starts replying before the whole part is in. With a `guard` (p2pfed/robust.py), a copy that
is not finite or breaks the norm bound is dropped as it arrives; with a robust `rule`, a piece's copies are kept
and combined by it (trimmed mean, centered clip) instead of summed. Used by p2pfed/butterfly.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from p2pfed.compression import Compressor, Payload
from p2pfed.robust import Guard, Rule

__all__ = ["PIECE", "ButterflyStats", "NotJoined", "PartFailed", "ReducerFailed", "Slice", "piece_round", "piece_sizes"]

PIECE = 1 << 20  # elements per piece of a part: the unit of reduction and reply


class PartFailed(Exception):
    """A part or reply that did not arrive whole: recorded as the round's reason, never raised to the caller."""


class ReducerFailed(PartFailed):
    """A reducer that answered, with an error (its slice failed: another member's part never came): reachable."""


class NotJoined(PartFailed):
    """A member that answers for an all-reduce it never started: it is the one missing."""


@dataclass(slots=True)
class ButterflyStats:
    """What one all-reduce moved: payload plus framing bytes, per remote peer (base58 id) for bytes sent."""

    bytes_sent: int = 0
    bytes_received: int = 0
    sent_by_peer: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0  # wall time of the round's all-reduces (set by the averager)
    dropped: list[str] = field(default_factory=list)  # members' copies this peer's slices dropped, and why
    unreachable: set[str] = field(default_factory=set)  # members (base58 ids) whose part or reply never came whole
    not_joined: set[str] = field(default_factory=set)  # of those, members that said they never started this all-reduce
    # this peer holds a piece of the result: its slice reduced one, or a reducer's reply came (secure aggregation
    # re-forms a failed round only where it can tell which pieces: p2pfed/phases.py)
    held: bool = False
    # a failed all-reduce: the pieces of its result this peer holds, as (start, stop, whole) in the vector's
    # coordinates (whole: every value of it is in `partial`; else only some of its bytes came), and the result
    # buffer those whole pieces are in. Per all-reduce: merge() does not carry them (secagg.held_of reads them)
    pieces: list[tuple[int, int, bool]] = field(default_factory=list)
    partial: torch.Tensor | None = None

    def add_sent(self, peer: str, n: int) -> None:
        self.bytes_sent += n
        self.sent_by_peer[peer] = self.sent_by_peer.get(peer, 0) + n

    def merge(self, other: ButterflyStats) -> None:
        """Add another all-reduce of the same round (a phase, a cloud's leg); the first failure's reason stays."""
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        for peer, n in other.sent_by_peer.items():
            self.sent_by_peer[peer] = self.sent_by_peer.get(peer, 0) + n
        self.reason = self.reason or other.reason
        self.dropped += other.dropped
        self.unreachable |= other.unreachable
        self.not_joined |= other.not_joined
        self.held = self.held or other.held


def piece_sizes(size: int, piece: int | None = None) -> list[int]:
    """A part travels and is reduced in pieces of at most `piece` (default PIECE) elements, so replies start before it
    all arrived."""
    piece = piece or PIECE
    return [min(piece, size - start) for start in range(0, size, piece)]


def piece_round(round: int, index: int) -> int:
    """The codec's round for one piece: distinct pieces draw distinct rounding noise."""
    return (round * 4099 + index) % (1 << 62)


class Slice:
    """The part this peer reduces in one all-reduce, piece by piece: the weighted sums so far, and the one reply per
    piece that every sender gets as soon as every sender's copy of that piece has arrived."""

    def __init__(
        self,
        *,
        peers: Sequence[PeerID],
        senders: int,
        size: int,
        codec: Compressor,
        round: int,
        stats: ButterflyStats,
        replies: int | None = None,
        reply_codec: Compressor | None = None,
        guard: Guard | None = None,
        rule: Rule | None = None,
        clear: torch.Tensor | None = None,
    ) -> None:
        self.peers, self.senders, self.codec, self.round, self.stats = peers, senders, codec, round, stats
        self.guard, self.rule = guard, rule
        self.reply_codec = reply_codec or codec  # the form the reduced pieces go back in
        self.replies = senders - 1 if replies is None else replies  # streams that wait for this slice's mean
        self.sizes = piece_sizes(size)
        self.totals: list[torch.Tensor | None] = [None] * len(self.sizes)  # (piece,) fp32, sums of weight * piece
        self.weights = [0.0] * len(self.sizes)
        self.kept: list[list[torch.Tensor]] = [[] for _ in self.sizes]  # with a rule: the copies that passed
        self.seen: list[set[int]] = [set() for _ in self.sizes]
        self.ready = [asyncio.Event() for _ in self.sizes]
        self.reply: list[Payload | None] = [None] * len(self.sizes)
        # secure aggregation: this reducer's own values, which the codec adds to each piece's decoded sum
        self.clear: list[torch.Tensor | None] = [None] * len(self.sizes)
        if clear is not None:
            self.clear[:] = clear.split(self.sizes)
        self.reduced = 0
        self.done = asyncio.Event()  # every piece reduced, or the slice failed
        self.error = ""
        self.replied = 0  # senders that got every piece back
        self.all_replied = asyncio.Event()

    def add(self, sender: int, index: int, weight: float, piece: torch.Tensor, *, owned: bool = False) -> None:
        """Add one member's copy of piece `index`; `owned`: the slice may keep `piece` and write into it."""
        if sender in self.seen[index]:
            raise PartFailed(f"member {sender} sent piece {index} twice")
        self.seen[index].add(sender)
        # ring elements of secure aggregation are noise by design: only plain values can be screened
        reason = self.guard.check(piece) if self.guard is not None and piece.is_floating_point() else ""
        if reason:  # this copy never reaches a sum: the piece's mean is over the other members
            self.stats.dropped.append(f"member {sender}'s piece {index}: {reason}")
        elif self.rule is not None:
            self.kept[index].append(piece if owned else piece.clone())
            self.weights[index] += weight
        else:
            self.totals[index] = self.codec.reduce(self.totals[index], piece, weight, owned=owned)
            self.weights[index] += weight
        if len(self.seen[index]) == self.senders:
            self._finish(index)

    def add_all(self, sender: int, weight: float, part: torch.Tensor) -> None:
        for index, piece in enumerate(part.split(self.sizes)):
            self.add(sender, index, weight, piece)

    def missing(self) -> set[int]:
        """The senders that have not delivered every piece of their part (yet)."""
        return {sender for sender in range(self.senders) if any(sender not in seen for seen in self.seen)}

    def fail(self, reason: str) -> None:
        if not self.done.is_set():
            self.error = reason
            for event in self.ready:
                event.set()
            self.done.set()

    async def piece(self, index: int) -> Payload:
        await self.ready[index].wait()
        payload = self.reply[index]
        if payload is None:
            raise PartFailed(self.error or "slice failed")
        return payload

    def _finish(self, index: int) -> None:
        total = self.totals[index]
        if self.rule is not None and self.kept[index]:
            mean = self.rule.combine(self.kept[index])
            self.kept[index] = []
        elif total is not None:
            mean = self.codec.reduced(total, self.weights[index], clear=self.clear[index])  # total: this slice's own
        else:
            self.fail(f"every member's copy of piece {index} was dropped")
            return
        self.reply[index] = self.reply_codec.compress(mean, round=piece_round(self.round, index))
        self.totals[index] = self.clear[index] = None  # the reply is all that is needed from here on
        self.ready[index].set()
        self.reduced += 1
        if self.reduced == len(self.sizes):
            self.done.set()

    def decode_into(self, out: torch.Tensor) -> torch.Tensor:
        """This slice's mean as every member decodes it, from the replies, written into `out` (size,)."""
        if len(self.decode_reduced(out)) < len(self.sizes):
            raise PartFailed(f"this peer's slice failed: {self.error}")
        return out

    def decode_reduced(self, out: torch.Tensor) -> list[int]:
        """The pieces reduced so far, decoded into their place in `out` (size,) as every member decodes them; their
        indices."""
        done = []
        for index, (payload, dest) in enumerate(zip(self.reply, out.split(self.sizes), strict=True)):
            if payload is not None:
                dest.copy_(
                    self.reply_codec.decompress(payload, numel=dest.numel(), round=piece_round(self.round, index))
                )
                done.append(index)
        return done
