"""Secure aggregation: pairwise additive masks in the ring Z_2^b, so that whoever reduces a slice sees uniform noise.

    key = MaskKey()                                        # this averager's X25519 pair; key.public goes in `gather`
    secure = SecureAggregation(key, run=b"p2pfed_run1")
    mean = await secure.allreduce(vector, codec, phase, inner=allreduce, group=group)   # None if the round failed

One all-reduce of `vector` (flat fp32) under masks, with `inner` the plain all-reduce of p2pfed/butterfly.py:

1. Scale. Every member learns each member's weight share w_i / sum(w) and the largest |w_i x_i| / sum(w): the
   shared fixed-point scale. For a dense round both come with the mask keys in the round's gathered metadata; for
   the vectors a reduction computes during the round (random-k coordinates, PowerSGD's P and Q) a small clear
   all-reduce of one-hot vectors carries them. Those 2 numbers per member are all it reveals in the clear.
2. Quantize. Each member maps (w_i / sum(w)) x_i to integers in [-L, L], L = 2^(v-1) - 1, with stochastic rounding
   for v <= 16 (8 bits for uint8, 16 for fp16) and round-to-nearest for fp32's v = 32 - ceil(log2 (n - 1)). Every
   reducer is a member and knows its own integers: the ring needs to hold only the sum of the n - 1 others, which
   fits in b = v + ceil(log2 (n - 1)) bits (b = 32 for fp32; 9 bits for uint8 in a group of 3, not 10). Stochastic
   rounding works in integers: the value to 1/256 of a level, plus one private random byte (a ChaCha20 stream under
   a key of this member's own), shifted down by 8 bits: unbiased, and a fraction of the cost of drawing a float per
   element.
3. Mask. Each pair (i, j) derives a 32-byte key with X25519 + HKDF-SHA256, bound to the run (salt), the round's
   all-reduce tag (group id and phase) and the group's member list; ChaCha20 expands it into one mask per element.
   The member with the smaller peer id adds the mask, the other subtracts it, modulo 2^b. A ring of b <= 16 bits
   takes 16 bits of keystream per element, a wider one 32. A pair's masks skip the slices that either of the two
   reduces: a reducer knows the masks it shares, so they would hide nothing from it, and on its slice each other
   member's copy stays hidden by its masks with the n - 2 members left (in a group of 3, one keystream per member
   where there were two; in a group of 2 none, as nothing can hide one member's update from the other: the mean
   minus one's own update is the other's). A reducer reached through a relay keeps every mask on its slice, since
   the relay sees the copies it forwards and may share one of those masks.
4. Sum. The butterfly all-reduce sums the masked elements modulo 2^b (compression/ring.py, b bits per element on
   the way to each reducer); the masks cancel. Each reducer takes its own integers out of that sum, decodes the
   exact sum of the other members' (what it learns is what the mean and its own update tell it anyway), adds its
   own back: the weighted mean of its slice, sent back through the round's own codec (fp32, fp16 or uint8: the reply
   leg carries the group's result, nothing private). Bit for bit what the same round computes without masks.

A member that drops out fails the butterfly round for everyone (it is strict), so a half-masked sum never reaches
a model. The members left re-run the round at once with the same updates (fresh masks, fresh rounding: a new group;
p2pfed/phases.py: may_reform). A piece of the failed round's result that a member holds (its slice reduced it, or
its reply came) is a mean that includes the dropped member's update, and the same mean over the members left would
give that update away, so the re-run keeps those pieces (keep_held): every member names the pieces it holds, and
there the holders put in the held mean and the others zero. That goes per all-reduce of the round (Group.held, by
phase): PowerSGD's mean P, held whole by all once it completed, stays as it was, and the re-run draws with the
failed round's seed, so random-k picks the same coordinates. A re-formed masked group must be exactly the members
left, each re-forming the same round (p2pfed/allreduce.py: _reform_refusal, _held_claims), or no one re-forms.

Composes with every linear reduction (fp32, fp16, uint8, shared-seed random-k coordinates, PowerSGD's P and Q),
since each all-reduce of a round goes through here.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pfed.butterfly import split_sizes
from p2pfed.compression import Compressor, Fp16, Fp32, Uint8
from p2pfed.compression.base import RoundingBytes
from p2pfed.compression.ring import Ring
from p2pfed.pieces import ButterflyStats

__all__ = ["Group", "Held", "MaskKey", "SecureAggregation", "held_of", "keep_held", "ring_bits"]

# inner(vector, codec, phase, reply=None, clear=None): the plain all-reduce; `reply` is the codec the reduced slices
# come back in, `clear` this member's values before masking (Butterfly.allreduce)
InnerAllReduce = Callable[..., Awaitable[torch.Tensor | None]]

_CHUNK = 1 << 18  # elements quantized and masked at a time: the float64 and keystream temporaries stay in cache
_VALUE_BITS = {Fp16: 16, Uint8: 8}  # fp32 takes what is left of 32 bits


class MaskKey:
    """This averager's X25519 key pair. The private half never leaves the process; the public half is published in
    the round's gathered metadata, so each pair of members can agree on a mask without another message."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes_raw()  # 32 bytes

    def pair_key(self, their_public: bytes, *, run: bytes, tag: bytes, members: Sequence[bytes]) -> bytes:
        """The 32-byte mask key this member shares with the owner of `their_public` for one all-reduce."""
        shared = self.private.exchange(X25519PublicKey.from_public_bytes(their_public))
        info = b"p2pfed-mask\x00" + tag + b"\x00" + b"".join(members)
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=run, info=info).derive(shared)


@dataclass(frozen=True, slots=True)
class Held:
    """What the members of a re-formed round hold of one all-reduce (phase) of the failed round's result."""

    pieces: Sequence[Sequence[tuple[int, int, bool]]]  # per member, in group order: (start, stop, whole)
    values: torch.Tensor | None  # the failed all-reduce's result where this member's pieces are whole
    abs: float  # the largest |value| that any member holds whole: the shared scale must cover it


@dataclass(frozen=True, slots=True)
class Group:
    """The members of one round, in group order: their peer ids (bytes) and mask public keys, and this member."""

    peers: Sequence[bytes]
    publics: Sequence[bytes]
    me: int
    tag: bytes  # the round's all-reduce tag: group id (and phase, added per all-reduce)
    # What each member published with its key: its weight and its update's largest |value|, for the phases whose
    # vector is that update (`scaled`): their scale needs no exchange of its own.
    maxabs: Sequence[float] = ()
    weights: Sequence[float] = ()
    # How the butterfly splits each vector among the reducers (Butterfly.allreduce's shares; empty: equal parts),
    # and the members it reaches through a relay, which sees the parts it forwards
    shares: Sequence[float] = ()
    relayed: Collection[int] = frozenset()
    # A re-formed round: per phase, what the members hold of that all-reduce of the failed round (keep_held)
    held: Mapping[str, Held] = field(default_factory=dict)

    def sizes(self, numel: int) -> list[int]:
        """The slice each member reduces of a vector of numel elements, in group order."""
        return split_sizes(numel, self.shares or [1.0] * len(self.peers))


def ring_bits(codec: Compressor, n: int) -> tuple[int, int]:
    """(value bits v, ring bits b) for a codec in a group of n; ValueError for codecs that cannot be masked. The ring
    holds the sum of the n - 1 members other than the reducer, which adds its own values after decoding."""
    extra = math.ceil(math.log2(n - 1)) if n > 2 else 0
    if type(codec) is Fp32:
        return 32 - extra, 32
    value = _VALUE_BITS.get(type(codec))
    if value is None:
        raise ValueError(f"secure aggregation needs a linear or fixed-point codec, not {type(codec).__name__}")
    return value, value + extra


class SecureAggregation:
    """Runs one peer's masked all-reduces. `mask=False` runs the same fixed-point round without masks: the
    reference the masked round must equal bit for bit (and what a reducer would see without masking)."""

    def __init__(self, key: MaskKey, *, run: bytes, mask: bool = True, seed: int | None = None) -> None:
        self.key, self.run, self.mask = key, run, mask
        # Rounding noise is this peer's own: private, unless a test fixes the seed.
        private = os.urandom(32) if seed is None else hashlib.sha256(b"p2pfed-rounding" + str(seed).encode()).digest()
        self._rounding = RoundingBytes(private)

    async def allreduce(
        self,
        vector: torch.Tensor,
        codec: Compressor,
        phase: str,
        *,
        inner: InnerAllReduce,
        group: Group,
        scaled: Collection[str] = (),
    ) -> torch.Tensor | None:
        """The group's weighted mean of `vector`, masked on the wire; None when an all-reduce of it failed. For a
        phase in `scaled`, `vector` is what each member described in group.maxabs and group.weights."""
        n, me = len(group.peers), group.me
        value_bits, bits = ring_bits(codec, n)
        x = vector.detach().reshape(-1).float()
        # 1. the weight shares and the shared scale: published with the keys, or exchanged in the clear now
        if phase in scaled and len(group.maxabs) == n and len(group.weights) == n:
            total_weight = sum(group.weights)
            scale = max(w * m / total_weight for w, m in zip(group.weights, group.maxabs, strict=True))
            mine = group.weights[me] / total_weight
        else:
            onehot = torch.zeros(2 * n)
            onehot[me] = x.abs().max() if x.numel() else 0.0
            onehot[n + me] = 1.0
            shares = await inner(onehot, Fp32(), phase + ".scale")
            if shares is None:
                return None
            scale, mine = float(shares[:n].max()), float(shares[n + me])
        held = group.held.get(phase)
        if held is not None:  # a re-formed round: the members' held pieces of this all-reduce stay as they are
            if any(stop > x.numel() for pieces in held.pieces for _, stop, _ in pieces):
                return None
            x = x.clone()
            keep_held(x, me=me, pieces=held.pieces, values=held.values, share=mine)
            scale = max(scale, held.abs)
        if not scale > 0.0 or not math.isfinite(scale):
            return None if not math.isfinite(scale) else torch.zeros_like(x)
        levels = (1 << (value_bits - 1)) - 1
        # 2-3. fixed point, then masks: off the event loop, which meanwhile serves the members that send this peer
        # their parts (numpy, torch and ChaCha20 release the GIL for the bulk of it)
        clear = torch.empty(group.sizes(x.numel())[me], dtype=torch.int32)  # this peer's own slice, unmasked
        masked = await asyncio.to_thread(
            self.masked, x, factor=mine * levels / scale, levels=levels, bits=bits, stochastic=value_bits <= 16,
            group=group, tag=group.tag + phase.encode(), clear=clear,
        )  # fmt: skip
        # 4. the exact sum in Z_2^b, decoded by each reducer and sent back in the round's codec
        reply = Fp32() if type(codec) is Fp32 else codec
        return await inner(masked, Ring(bits=bits, unit=scale / levels), phase + ".ring", reply=reply, clear=clear)

    def masked(
        self,
        x: torch.Tensor,
        *,
        factor: float,
        levels: int,
        bits: int,
        stochastic: bool,
        group: Group,
        tag: bytes,
        clear: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(numel,) int32 carrying ring elements: round(factor * x), plus on each member's slice the masks this member
        shares with the others but that slice's reducer, modulo 2^b. `clear`: (this member's slice size,) int32 that
        receives round(factor * x) on its own slice.

        A reducer knows every mask it shares, so a mask with it would hide nothing from it: on its slice the members
        leave those out (each pair's keystream skips the slices of both), and its own copy is its clear value. A
        member's copy is still hidden by its masks with the n - 2 others. A reducer reached through a relay keeps
        every mask on its slice: the relay sees the copies it forwards, and may share one of those masks itself."""
        numel = x.numel()
        out = torch.empty(numel, dtype=torch.int32)
        out_u32 = out.numpy().view(np.uint32)
        streams = self._streams(group, tag) if self.mask else {}
        size = min(_CHUNK, max(numel, 1))
        keystream = np.empty(size, dtype=np.uint16 if bits <= 16 else np.uint32)  # uniform modulo 2^b either way
        zeros = np.zeros(keystream.nbytes, dtype=np.uint8)
        me, sizes = group.me, group.sizes(numel)
        firsts = list(itertools.accumulate([0, *sizes[:-1]]))  # where each member's slice starts
        mine = firsts[me]
        chunks = []  # (start, stop, reducer): no chunk spans two slices
        for reducer, (first, part) in enumerate(zip(firsts, sizes, strict=True)):
            chunks += [(lo, min(lo + _CHUNK, first + part), reducer) for lo in range(first, first + part, _CHUNK)]
        for start, stop, reducer in chunks:
            count = stop - start
            if stochastic:  # |y| <= 2^15, so 256 y is an integer fp32 holds exactly: floor((256 y + u) / 256)
                y = self._rounding.floor_(x[start:stop].mul(factor * 256.0).round_().to(torch.int32))
            else:  # up to 2^31 levels: round in fp64
                y = x[start:stop].double().mul_(factor).round_()
            y.clamp_(-levels, levels)  # the shared scale is rounded to fp32: keep the sum's range exact
            chunk = out_u32[start:stop]
            chunk[:] = y.to(torch.int32).numpy().view(np.uint32)  # two's complement: the value modulo 2^32
            if clear is not None and reducer == me:
                clear[start - mine : stop - mine].numpy()[:] = chunk.view(np.int32)
            relayed = reducer in group.relayed
            for j, (sign, encryptor) in streams.items():
                if not relayed and reducer in (me, j):
                    continue
                encryptor.update_into(zeros[: keystream.itemsize * count].data, keystream[:count].view(np.uint8).data)
                if sign > 0:
                    np.add(chunk, keystream[:count], out=chunk)
                else:
                    np.subtract(chunk, keystream[:count], out=chunk)
        np.bitwise_and(out_u32, np.uint32((1 << bits) - 1), out=out_u32)
        return out

    def _streams(self, group: Group, tag: bytes) -> dict[int, tuple[int, CipherContext]]:
        """Each other member's index: +1 or -1 and a ChaCha20 keystream, the masks this member adds."""
        mine = group.peers[group.me]
        streams = {}
        for j, (peer, public) in enumerate(zip(group.peers, group.publics, strict=True)):
            if j == group.me:
                continue
            key = self.key.pair_key(public, run=self.run, tag=tag, members=group.peers)
            cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
            streams[j] = (1 if mine < peer else -1, cipher.encryptor())
        return streams


def held_of(
    mean: torch.Tensor | None, stats: ButterflyStats
) -> tuple[list[tuple[int, int, bool]], torch.Tensor | None] | None:
    """What this member holds of one masked all-reduce's result (the pieces, and the values where whole): all of it
    when it completed, the pieces its slice reduced and the replies that came when it failed; None: nothing."""
    if mean is not None:
        return [(0, mean.numel(), True)], mean
    return (stats.pieces, stats.partial) if stats.pieces else None


def keep_held(
    x: torch.Tensor,
    *,
    me: int,
    pieces: Sequence[Sequence[tuple[int, int, bool]]],
    values: torch.Tensor | None,
    share: float,
) -> tuple[int, int]:
    """Rewrite this member's (numel,) update `x` in place for a re-formed round whose members hold pieces of the
    failed round's result: (coordinates kept, coordinates zeroed).

    `pieces[i]`: what member i holds, (start, stop, whole) in the vector's coordinates; `values`: the failed
    round's result where this member's pieces are whole. A held piece is a mean over every member of the failed
    round, the vanished one included, and the re-formed round must not compute another mean over the same
    coordinates. So on every coordinate some member holds, the k members that hold it whole put in the held mean
    divided by k times their weight share (`share`, w_i / sum(w)), the others zero: the weighted mean the round
    computes there is the held mean itself. Where members hold only some bytes and nobody holds it whole, the mean
    is zero (that part of the step is lost). Elsewhere x stays: the round's mean there is over the members left."""
    bounds = sorted({b for held in pieces for start, stop, _ in held for b in (start, stop)})
    kept = zeroed = 0
    for lo, hi in itertools.pairwise(bounds):
        covering = [[whole for start, stop, whole in held if start <= lo and hi <= stop] for held in pieces]
        if not any(covering):
            continue
        holders = sum(any(c) for c in covering)
        if holders and any(covering[me]):
            assert values is not None  # a member with whole pieces has their values
            x[lo:hi] = values[lo:hi] / (holders * share)
        else:
            x[lo:hi] = 0.0
        kept, zeroed = (kept + hi - lo, zeroed) if holders else (kept, zeroed + hi - lo)
    return kept, zeroed
