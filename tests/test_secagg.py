"""Secure aggregation (p2pfed/secagg.py) over real libp2p daemons on loopback: the masked mean equals the unmasked
fixed-point mean bit for bit in groups of 2 to 8, with and without 8-bit quantization, and is within the fixed-point
bound of the plain-torch weighted mean; the slice a reducer receives from another member is uncorrelated with that
member's update when masked, and is that update when not (so the measurement can fail).

.venv/bin/python -m pytest -q tests/test_secagg.py
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from hivemind.p2p import PeerID

from p2pfed import pieces as pieces_module
from p2pfed.butterfly import Butterfly, split_sizes
from p2pfed.compression import Compressor, Fp16, Fp32, Uint8
from p2pfed.compression.ring import Ring, signed
from p2pfed.pieces import ButterflyStats
from p2pfed.secagg import Group, Held, InnerAllReduce, MaskKey, SecureAggregation, held_of, keep_held, ring_bits
from tests.conftest import butterfly_members

LISTEN = ["/ip4/127.0.0.1/tcp/0"]
TIMEOUT = 30.0
RUN = b"p2pfed_test_run"


def _members(n: int) -> contextlib.AbstractAsyncContextManager[list[Butterfly]]:
    return butterfly_members(n, chunk_timeout=10.0)


Record = Callable[[str, "torch.Tensor | None", ButterflyStats], None]


def _inner(
    b: Butterfly,
    tag: bytes,
    peers: Sequence[PeerID],
    me: int,
    *,
    weight: float,
    round: int,
    timeout: float = TIMEOUT,
    shares: Sequence[float] = (),
    record: Record | None = None,
) -> InnerAllReduce:
    """A member's plain all-reduce that SecureAggregation runs on (its `inner`): `b`'s butterfly all-reduce under
    tag + phase, equal shares unless given; `record(phase, mean, stats)` sees each all-reduce's outcome."""

    async def inner(
        vector: torch.Tensor,
        codec: Compressor,
        phase: str,
        reply: Compressor | None = None,
        clear: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        mean, stats = await b.allreduce(
            tag + phase.encode(), peers, me, vector, weight=weight, shares=list(shares) or [1.0] * len(peers),
            codec=codec, round=round, timeout=timeout, reply_codec=reply, clear=clear,
        )  # fmt: skip
        if record is not None:
            record(phase, mean, stats)
        return mean

    return inner


async def _secure_round(
    butterflies: Sequence[Butterfly],
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    codec: Compressor,
    *,
    mask: bool,
    tag: bytes,
    absent: Sequence[int] = (),
    timeout: float = TIMEOUT,
    published: bool = False,
    shares: Sequence[float] = (),
    relayed: frozenset[int] = frozenset(),
) -> list[torch.Tensor | None]:
    """One secure all-reduce on every member; rounding seeds fixed per member so masked and unmasked runs compare.
    `shares`: how the butterfly splits the vector (empty: equally); `relayed`: members masked as if behind a relay."""
    peers = [b.p2p.peer_id for b in butterflies]
    shares = list(shares) or [1.0] * len(peers)
    keys = [MaskKey() for _ in butterflies]
    publics = [k.public for k in keys]

    async def member(i: int) -> torch.Tensor | None:
        inner = _inner(butterflies[i], tag, peers, i, weight=weights[i], round=3, timeout=timeout, shares=shares)
        secure = SecureAggregation(keys[i], run=RUN, mask=mask, seed=1000 + i)
        group = Group(
            peers=[p.to_bytes() for p in peers], publics=publics, me=i, tag=tag,
            maxabs=[float(v.abs().max()) for v in vectors], weights=weights, shares=shares, relayed=relayed,
        )  # fmt: skip
        scaled = {"dense"} if published else set()  # else the scale is exchanged in a clear all-reduce first
        return await secure.allreduce(vectors[i], codec, "dense", inner=inner, group=group, scaled=scaled)

    return list(await asyncio.gather(*(member(i) for i in range(len(butterflies)) if i not in absent)))


def _vectors(n: int, numel: int) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(10 + i)) * (i + 1) for i in range(n)]


def _weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return sum(w * v.double() for v, w in zip(vectors, weights, strict=True)) / sum(weights)  # type: ignore[return-value]


@pytest.mark.parametrize("bits", [1, 7, 8, 10, 13, 16, 20, 32])
def test_ring_payloads_are_b_bits_per_element_and_lossless(bits: int) -> None:
    ring = Ring(bits=bits)
    numel = 10_001
    values = torch.from_numpy(
        np.random.default_rng(bits).integers(0, 1 << bits, size=numel, dtype=np.uint64).astype(np.uint32).view(np.int32)
    )
    payload = ring.compress(values, round=0)
    assert len(payload.data) == numel * (bits // 8) + (bits % 8) * ((numel + 7) // 8)
    assert torch.equal(ring.decompress(payload, numel=numel, round=0), values)
    # The reducer's sum wraps modulo 2^b
    total = ring.reduce(None, values.clone(), 1.0, owned=True)
    total = ring.reduced(ring.reduce(total, values, 5.0, owned=False), 2.0)
    expected = (values.numpy().view(np.uint32).astype(np.uint64) * 2) % (1 << bits)
    assert np.array_equal(total.numpy().view(np.uint32), expected.astype(np.uint32))


def test_value_and_ring_bits_leave_room_for_the_sum_of_the_group() -> None:
    # the ring holds the sum of the n - 1 members other than the reducer
    assert ring_bits(Uint8(seed=0), 2) == (8, 8)
    assert ring_bits(Uint8(seed=0), 3) == (8, 9)
    assert ring_bits(Uint8(seed=0), 8) == (8, 11)
    assert ring_bits(Fp16(), 3) == (16, 17)
    assert ring_bits(Fp32(), 5) == (30, 32)
    with pytest.raises(ValueError, match="secure aggregation"):
        ring_bits(Ring(bits=8), 2)


@pytest.mark.parametrize(
    ("codec", "n"), [(Uint8(seed=0), 2), (Uint8(seed=0), 3), (Uint8(seed=0), 5), (Fp16(), 3), (Fp32(), 2), (Fp32(), 3)]
)
def test_a_reducer_decodes_the_others_sum_from_the_ring_and_adds_its_own(codec: Compressor, n: int) -> None:
    # Prepare: n members' fixed-point values in [-L, L], the extremes included, under pairwise masks modulo 2^b
    value_bits, bits = ring_bits(codec, n)
    levels, modulus = (1 << (value_bits - 1)) - 1, 1 << bits
    rng = np.random.default_rng(n * 100 + bits)
    numel = 4_096
    values = rng.integers(-levels, levels + 1, size=(n, numel), dtype=np.int64)
    values[:, 0], values[:, 1] = levels, -levels  # every member at the top, then the bottom: the widest sums
    masks = np.zeros((n, numel), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            m = rng.integers(0, modulus, size=numel, dtype=np.int64)
            masks[i] += m
            masks[j] -= m
    elements = [torch.from_numpy(((values[i] + masks[i]) % modulus).astype(np.uint32).view(np.int32)) for i in range(n)]
    unit = 2.0 ** (1 - value_bits)  # a power of 2: scaling in fp32 or fp64 rounds only where the sum itself must
    ring = Ring(bits=bits, unit=unit)

    # Execute: reducer 0 sums every member's element, its own included, then decodes with its own values apart
    total = None
    for element in elements:
        total = ring.reduce(total, element.clone(), 1.0, owned=True)
    assert total is not None
    own = torch.from_numpy(values[0].astype(np.int32))
    mean = ring.reduced(total.clone(), 1.0, clear=own)

    # Assert: the exact sum of all n, scaled once; without its own values apart the widest sums do not fit the ring
    expected = torch.from_numpy((values.sum(0).astype(np.float64) * unit).astype(np.float32))
    assert torch.equal(mean, expected)
    if n > 2:
        assert not torch.equal(ring.reduced(total.clone(), 1.0)[:2], expected[:2])


def test_stochastic_rounding_is_unbiased_and_private() -> None:
    # 8-bit fixed point of values between levels: the mean over many roundings is the value itself, and two members'
    # rounding noise differs even for the same value
    group = Group(peers=[b"a"], publics=[MaskKey().public], me=0, tag=b"t")
    x = torch.linspace(-3.0, 3.0, 1_000).repeat(400)  # 400 roundings of each value
    factor = 127 / 3.0

    def rounded(seed: int) -> torch.Tensor:
        secure = SecureAggregation(MaskKey(), run=RUN, mask=False, seed=seed)
        ring = secure.masked(x, factor=factor, levels=127, bits=9, stochastic=True, group=group, tag=b"r")
        return torch.from_numpy(signed(ring, bits=9)).view(400, 1_000)

    draws = rounded(1)
    exact = x[:1_000].double() * factor
    assert ((draws - exact).abs() < 1.0).all()  # floor or ceiling of each value, nothing else
    assert (draws.mean(0) - exact).abs().max().item() < 0.1  # 400 draws: std of the mean <= 0.025
    assert (draws.mean() - exact.mean()).abs().item() < 0.005  # no bias overall (std 0.0008)
    assert not torch.equal(draws, rounded(2))


def test_masked_mean_equals_the_unmasked_fixed_point_mean_bit_for_bit_in_groups_of_2_to_8() -> None:
    async def main() -> None:
        async with _members(8) as everyone:
            for n in range(2, 9):
                butterflies = everyone[:n]
                vectors, weights = _vectors(n, 20_011), [float(i % 3 + 1) for i in range(n)]
                reference = _weighted_mean(vectors, weights)
                for codec, published in ((Fp32(), False), (Uint8(seed=0), False), (Uint8(seed=0), True)):
                    tag = f"{n}-{type(codec).__name__}-{published}".encode()
                    masked = await _secure_round(
                        butterflies, vectors, weights, codec, mask=True, tag=tag + b"m", published=published
                    )
                    clear = await _secure_round(
                        butterflies, vectors, weights, codec, mask=False, tag=tag + b"c", published=published
                    )
                    value_bits, _ = ring_bits(codec, n)
                    scale = max(w * v.abs().max().item() for v, w in zip(vectors, weights, strict=True)) / sum(weights)
                    step = scale / ((1 << (value_bits - 1)) - 1)  # one fixed-point unit
                    for m, c in zip(masked, clear, strict=True):
                        assert m is not None and c is not None
                        assert torch.equal(m, c), f"group of {n}, {codec}: masked and unmasked means differ"
                        assert torch.equal(m, masked[0])  # every member holds the same mean
                        # each member's rounding is off by less than one unit (half for round-to-nearest); an
                        # 8-bit round's reply is then quantized to one of 256 levels per 1,024-value chunk
                        reply = 0.0 if isinstance(codec, Fp32) else float(reference.max() - reference.min()) / 255
                        assert (m.double() - reference).abs().max().item() <= n * step * 1.001 + reply + 1e-6

    asyncio.run(main())


def test_uneven_slices_and_a_relayed_reducer_keep_the_masks_cancelling() -> None:
    # Each pair's keystream skips the slices of both members unless one is relayed: with slices of four sizes (one
    # empty) and a relayed member, the masked mean must still equal the unmasked one bit for bit
    async def main() -> None:
        async with _members(4) as butterflies:
            vectors, weights = _vectors(4, 30_007), [1.0, 2.0, 1.0, 3.0]
            reference = _weighted_mean(vectors, weights)
            for shares, relayed in (([1.0, 2.0, 0.5, 1.5], frozenset({1})), ([1.0, 0.0, 3.0, 1.0], frozenset({0, 2}))):
                tag = f"uneven-{shares}-{sorted(relayed)}".encode()
                means = {}
                for mask in (True, False):
                    means[mask] = await _secure_round(
                        butterflies, vectors, weights, Uint8(seed=0), mask=mask, tag=tag + b"%d" % mask,
                        shares=shares, relayed=relayed,
                    )  # fmt: skip
                for m, c in zip(means[True], means[False], strict=True):
                    assert m is not None and c is not None
                    assert torch.equal(m, c)
                    assert (m.double() - reference).abs().max().item() < 0.1 * reference.abs().max().item()

    asyncio.run(main())


def test_a_relay_that_is_a_member_cannot_unmask_what_it_forwards() -> None:
    # Member 1 forwards member 0's copy of member 2's slice. Had member 0 left out its mask with member 2 (as for a
    # reducer reached directly), that copy would be y_0 + m_01, and member 1, which knows m_01 from its own copy of
    # the slice, would read y_0. Measured both ways, so the test can fail.
    n, numel = 3, 300_000
    keys = [MaskKey() for _ in range(n)]
    x = _vectors(n, numel)
    modulus = 1 << 32

    def slice_2(i: int, *, mask: bool, relayed: frozenset[int]) -> np.ndarray:
        """Member i's copy of member 2's slice (fp32's fixed point, rounded to nearest), as int64."""
        group = Group(peers=[b"a", b"b", b"c"], publics=[k.public for k in keys], me=i, tag=b"t", relayed=relayed)
        secure = SecureAggregation(keys[i], run=RUN, mask=mask)
        ring = secure.masked(x[i], factor=3e7, levels=(1 << 30) - 1, bits=32, stochastic=False, group=group, tag=b"r")
        return ring.numpy().view(np.uint32)[2 * numel // 3 :].astype(np.int64)

    truth = x[0][2 * numel // 3 :].double().numpy()
    corr = {}
    for relayed in (frozenset({2}), frozenset()):
        theirs = slice_2(0, mask=True, relayed=relayed)
        # what the relay can compute from its own copy and its own values: m_01 cancels
        seen = (theirs + slice_2(1, mask=True, relayed=relayed) - slice_2(1, mask=False, relayed=relayed)) % modulus
        corr[bool(relayed)] = float(np.corrcoef(np.where(seen >= modulus // 2, seen - modulus, seen), truth)[0, 1])
    assert abs(corr[True]) <= 0.01, corr
    assert corr[False] > 0.99, corr


def test_a_reducer_sees_noise_with_masks_and_the_update_without(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record every ring piece each reducer adds, with whether it was the reducer's own (owned=False)
    seen: list[tuple[object, int, int, torch.Tensor, bool]] = []
    add = pieces_module.Slice.add

    def recording_add(self, sender, index, weight, piece, *, owned=False):  # type: ignore[no-untyped-def]
        if piece.dtype == torch.int32:
            seen.append((self, sender, index, piece.clone(), owned))
        return add(self, sender, index, weight, piece, owned=owned)

    monkeypatch.setattr(pieces_module.Slice, "add", recording_add)
    n, numel = 3, 3_000_000  # 1M-element slices: an uncorrelated slice measures |corr| ~ 0.001

    async def main() -> dict[bool, float]:
        out = {}
        async with _members(n) as butterflies:
            vectors = _vectors(n, numel)
            for mask in (True, False):
                seen.clear()
                means = await _secure_round(butterflies, vectors, [1.0] * n, Fp32(), mask=mask, tag=b"leak%d" % mask)
                assert all(m is not None for m in means)
                # reducer 0's slice: find it by its own piece, then take what member 1 sent it
                slices = {id(s) for s, sender, _, _, owned in seen if sender == 0 and not owned}
                received = sorted((i, p) for s, sender, i, p, owned in seen if id(s) in slices and sender == 1)
                ring = torch.cat([p for _, p in received])
                sizes = split_sizes(numel, [1.0] * n)
                truth = vectors[1][: sizes[0]].double()
                observed = signed(ring, bits=32)
                out[mask] = float(np.corrcoef(observed, truth.numpy())[0, 1])
        return out

    corr = asyncio.run(main())
    assert abs(corr[True]) <= 0.01, corr
    assert corr[False] > 0.99, corr


def test_a_member_that_drops_out_fails_the_masked_round_for_everyone() -> None:
    async def main() -> None:
        async with _members(3) as butterflies:
            vectors = _vectors(3, 10_000)
            results = await _secure_round(
                butterflies, vectors, [1.0, 1.0, 1.0], Uint8(seed=0), mask=True, tag=b"drop", absent=[2], timeout=3.0
            )
            assert results == [None, None]

    asyncio.run(main())


def test_keep_held_gives_the_held_mean_where_a_member_holds_it_whole_and_zero_where_held_in_part() -> None:
    # Prepare: members 0 and 1 hold [0, 4) whole, member 1 also some bytes of [4, 8); nobody holds [8, 12)
    weights = [1.0, 2.0, 3.0]
    held = torch.arange(12, dtype=torch.float32) + 1.0
    pieces = [[(0, 4, True)], [(0, 4, True), (4, 8, False)], []]
    xs = [torch.full((12,), 10.0 * (i + 1)) for i in range(3)]

    # Execute: each member rewrites its update
    counts = [
        keep_held(x, me=i, pieces=pieces, values=held, share=w / sum(weights))
        for i, (x, w) in enumerate(zip(xs, weights, strict=True))
    ]

    # Assert: the weighted mean is the held mean on [0, 4), zero on [4, 8), the updates' mean on [8, 12)
    mean = sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights)
    assert counts == [(4, 4)] * 3
    assert torch.allclose(mean[:4], held[:4]) and torch.equal(mean[4:8], torch.zeros(4))
    assert torch.allclose(mean[8:], torch.full((4,), (10.0 + 40.0 + 90.0) / 6.0))
    assert torch.equal(xs[2][:8], torch.zeros(8))  # a member that holds nothing puts in nothing there


def test_a_masked_round_left_mid_transfer_is_re_run_keeping_the_pieces_members_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: three members of a masked 8-bit round, parts in pieces of 4,096 values. The third reduces its slice
    # but no reply of it leaves, and it leaves (its all-reduce cancelled, its streams cut) as soon as the first
    # averaged piece is back to it: its parts have left, and at least that piece's reducer holds a piece of the
    # result, a mean with the third's update; nobody holds the third's slice.
    monkeypatch.setattr(pieces_module, "PIECE", 4_096)
    n, numel, codec = 3, 30_000, Uint8(seed=0)
    vectors, weights = _vectors(n, numel), [1.0, 2.0, 3.0]

    def bound(result: torch.Tensor, members: Sequence[int], scale: float) -> float:
        """Each member's fixed-point rounding is off by less than one unit; the 8-bit reply adds one level."""
        return len(members) * scale / 127 * 1.001 + float(result.max() - result.min()) / 255 + 1e-6

    async def main() -> tuple[list[ButterflyStats], list[torch.Tensor | None]]:
        async with _members(n) as butterflies:
            peers = [b.p2p.peer_id for b in butterflies]
            keys = [MaskKey() for _ in range(n)]

            async def member(
                i: int, members: list[int], tag: bytes, held: Held | None = None
            ) -> tuple[torch.Tensor | None, ButterflyStats]:
                me, seen = members.index(i), ButterflyStats()

                def record(phase: str, mean: torch.Tensor | None, stats: ButterflyStats) -> None:
                    seen.pieces, seen.partial = stats.pieces, stats.partial  # its one all-reduce (a scaled phase)

                inner = _inner(
                    butterflies[i], tag, [peers[j] for j in members], me, weight=weights[i], round=7, timeout=10.0,
                    record=record,
                )  # fmt: skip

                group = Group(
                    peers=[peers[j].to_bytes() for j in members], publics=[keys[j].public for j in members], me=me,
                    tag=tag, maxabs=[float(vectors[j].abs().max()) for j in members],
                    weights=[weights[j] for j in members], held={} if held is None else {"dense": held},
                )  # fmt: skip
                secure = SecureAggregation(keys[i], run=RUN, seed=3000 + i)
                mean = await secure.allreduce(vectors[i], codec, "dense", inner=inner, group=group, scaled={"dense"})
                return mean, seen

            async def never_replies(channel: object, mine: pieces_module.Slice, index: int) -> None:
                await mine.done.wait()
                raise pieces_module.PartFailed("gone")

            monkeypatch.setattr(butterflies[2], "_when_reduced", never_replies)
            everyone = [asyncio.ensure_future(member(i, [0, 1, 2], b"left")) for i in range(n)]
            butterflies[2].on_reply = everyone[2].cancel
            failed = await asyncio.gather(*everyone[:2])
            with contextlib.suppress(asyncio.CancelledError):
                await everyone[2]
            assert [mean for mean, _ in failed] == [None, None]
            stats = [s for _, s in failed]

            # Execute: the two left re-run the round with the same updates, keeping what each holds
            pieces = [s.pieces for s in stats]
            held_abs = max(
                float(s.partial[a:b].abs().max()) for s in stats for a, b, w in s.pieces if w and s.partial is not None
            )
            helds = [Held(pieces=pieces, values=stats[k].partial, abs=held_abs) for k in (0, 1)]
            again = await asyncio.gather(*(member(i, [0, 1], b"again", helds[i]) for i in (0, 1)))
            return stats, [mean for mean, _ in again]

    stats, again = asyncio.run(main())

    # Assert: someone held a whole piece, and it was the mean of all three; the re-run's mean is that held mean
    # wherever a member held it whole, zero where members hold only some bytes, and the two members' mean elsewhere
    assert again[0] is not None and again[1] is not None and torch.equal(again[0], again[1])
    result = again[0].double()
    three, two = _weighted_mean(vectors, weights), _weighted_mean(vectors[:2], weights[:2])
    scale3 = max(w * float(v.abs().max()) for v, w in zip(vectors, weights, strict=True)) / sum(weights)
    expected, kept = two.clone(), torch.zeros(numel, dtype=torch.bool)
    for s in stats:
        for a, b, _ in s.pieces:  # held in part: zero, unless someone holds it whole (below)
            expected[a:b] = 0.0
    for s in stats:
        for a, b, whole in s.pieces:
            if whole:
                assert s.partial is not None
                assert (s.partial[a:b].double() - three[a:b]).abs().max() <= bound(three, range(3), scale3)
                expected[a:b], kept[a:b] = s.partial[a:b].double(), True
    assert kept.any(), [s.pieces for s in stats]
    for k in (0, 1):  # a reply that came from survivor k's slice: k reduced that piece, and says it holds it
        mine = numel // n * k, numel // n * (k + 1)
        for a, b, whole in stats[1 - k].pieces:
            assert not (whole and mine[0] <= a < mine[1]) or (a, b, True) in stats[k].pieces, (k, a, b)
    scale2 = max(max(w * float(v.abs().max()) for v, w in zip(vectors[:2], weights[:2], strict=True)) / 3.0, 0.0)
    held_abs = float(expected[kept].abs().max())
    error = (result - expected).abs()
    assert error[kept].max() <= bound(result, range(2), max(scale2, held_abs))
    assert (~kept).any() and error[~kept].max() <= bound(result, range(2), max(scale2, held_abs))
    # the kept coordinates are far from the two members' own mean: a re-run that lost them would fail above
    assert (three[kept] - two[kept]).abs().max() > 10 * bound(result, range(2), max(scale2, held_abs))


@pytest.mark.parametrize("name", ["randomk", "powersgd"])
def test_masking_composes_with_the_linear_reductions(name: str) -> None:
    # Prepare: each member's own reduction (shared seed, this member's peer seed), no error feedback
    from p2pfed.config import CompressionConfig
    from p2pfed.reductions import make_reduction

    n, numel = 3, 40_000
    vectors, weights = _vectors(n, numel), [1.0, 2.0, 3.0]

    async def main() -> dict[str, list[torch.Tensor | None]]:
        async with _members(n) as butterflies:
            peers = [b.p2p.peer_id for b in butterflies]
            keys = [MaskKey() for _ in range(n)]

            async def member(i: int, how: str) -> torch.Tensor | None:
                tag = f"{name}-{how}".encode()
                inner = _inner(butterflies[i], tag, peers, i, weight=weights[i], round=5)

                reduction = make_reduction(CompressionConfig(name=name, error_feedback=False), seed=0, peer_seed=i)
                if how == "plain":
                    return await reduction.run(vectors[i], inner, round=5)
                secure = SecureAggregation(keys[i], run=RUN, mask=how == "masked", seed=2000 + i)
                group = Group(peers=[p.to_bytes() for p in peers], publics=[k.public for k in keys], me=i, tag=tag)

                async def masked(vector: torch.Tensor, codec: Compressor, phase: str) -> torch.Tensor | None:
                    return await secure.allreduce(vector, codec, phase, inner=inner, group=group)

                return await reduction.run(vectors[i], masked, round=5)

            out = {}
            for how in ("plain", "masked", "clear"):
                out[how] = list(await asyncio.gather(*(member(i, how) for i in range(n))))
            return out

    # Execute
    results = asyncio.run(main())

    # Assert: masked equals the same fixed-point round without masks bit for bit, and the plain reduction to within
    # the fixed point's 29 value bits
    for masked, clear, plain in zip(results["masked"], results["clear"], results["plain"], strict=True):
        assert masked is not None and clear is not None and plain is not None
        assert torch.equal(masked, clear)
        assert torch.equal(masked, results["masked"][0])
        torch.testing.assert_close(masked, plain, atol=1e-5 * float(plain.abs().max()), rtol=0)


def test_a_masked_powersgd_round_left_in_its_second_all_reduce_keeps_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: three members of a masked PowerSGD round (P, then Q from the mean P), values in pieces of 64. The
    # third leaves in the Q all-reduce, its slice's means held back: every member holds the whole mean P of three,
    # and some pieces of the mean Q.
    from p2pfed.config import CompressionConfig
    from p2pfed.reductions import LowRank, make_reduction

    monkeypatch.setattr(pieces_module, "PIECE", 64)
    n, numel = 3, 40_000
    vectors, weights = _vectors(n, numel), [1.0, 2.0, 3.0]

    Holds = list[dict[str, tuple[list[tuple[int, int, bool]], torch.Tensor | None]]]

    async def main() -> tuple[list[dict[str, torch.Tensor | None]], Holds, list[torch.Tensor | None], LowRank]:
        async with _members(n) as butterflies:
            peers = [b.p2p.peer_id for b in butterflies]
            keys = [MaskKey() for _ in range(n)]
            holds: Holds = [{} for _ in range(n)]
            means: list[dict[str, torch.Tensor | None]] = [{} for _ in range(n)]

            async def member(i: int, members: list[int], tag: bytes, held: dict[str, Held]) -> torch.Tensor | None:
                me = members.index(i)

                def record(phase: str, mean: torch.Tensor | None, stats: ButterflyStats) -> None:
                    if i == 2 and phase == "q.scale":  # next comes Q's masked all-reduce: the third leaves in it
                        monkeypatch.setattr(butterflies[2], "_when_reduced", never_replies)
                        butterflies[2].on_reply = task.cancel
                    if phase.endswith(".ring"):
                        means[i][phase] = mean
                        holding = held_of(mean, stats)
                        if holding is not None:
                            holds[i][phase.removesuffix(".ring")] = holding

                inner = _inner(
                    butterflies[i], tag, [peers[j] for j in members], me, weight=weights[i], round=5, timeout=10.0,
                    record=record,
                )  # fmt: skip

                reduction = make_reduction(
                    CompressionConfig(name="powersgd", error_feedback=False), seed=0, peer_seed=i
                )
                secure = SecureAggregation(keys[i], run=RUN, seed=4000 + i)
                group = Group(
                    peers=[peers[j].to_bytes() for j in members], publics=[keys[j].public for j in members], me=me,
                    tag=tag, held=held,
                )  # fmt: skip

                async def masked(vector: torch.Tensor, codec: Compressor, phase: str) -> torch.Tensor | None:
                    return await secure.allreduce(vector, codec, phase, inner=inner, group=group)

                return await reduction.run(vectors[i], masked, round=5)

            async def never_replies(channel: object, mine: pieces_module.Slice, index: int) -> None:
                await mine.done.wait()
                raise pieces_module.PartFailed("gone")

            everyone = [asyncio.ensure_future(member(i, [0, 1, 2], b"left", {})) for i in range(n)]
            task = everyone[2]
            assert await asyncio.gather(*everyone[:2]) == [None, None]
            with contextlib.suppress(asyncio.CancelledError):
                await task
            failed, kept_before = [dict(means[i]) for i in (0, 1)], [dict(holds[i]) for i in (0, 1)]

            # Execute: the two left re-run the round with the same updates and seed, keeping what they hold
            phases = set(holds[0]) | set(holds[1])
            assert set(holds[0]) | set(holds[1]) == {"p", "q"}, holds
            held = [
                {
                    phase: Held(
                        pieces=[holds[k].get(phase, ([], None))[0] for k in (0, 1)],
                        values=holds[i].get(phase, ([], None))[1],
                        abs=max(
                            float(v[a:b].abs().max())
                            for k in (0, 1)
                            if phase in holds[k]
                            for a, b, w in holds[k][phase][0]
                            if w and (v := holds[k][phase][1]) is not None
                        ),
                    )  # fmt: skip
                    for phase in phases
                }
                for i in (0, 1)
            ]
            for i in (0, 1):
                means[i].clear()
            again = await asyncio.gather(*(member(i, [0, 1], b"again", held[i]) for i in (0, 1)))
            reference = make_reduction(CompressionConfig(name="powersgd", error_feedback=False), seed=0, peer_seed=0)
            assert isinstance(reference, LowRank)
            return failed, kept_before, [means[0].get("p.ring"), means[0].get("q.ring"), *again], reference

    failed, holds, (p_again, q_again, *again), reduction = asyncio.run(main())

    # Assert: the survivors agree; the re-run's mean P is the mean P of three (not of the two), and its mean Q is the
    # failed round's mean Q where a survivor holds it whole, the mean of the two's M_iᵀ P̂ elsewhere
    assert again[0] is not None and again[1] is not None and torch.equal(again[0], again[1])
    p_three = failed[0]["p.ring"]
    assert p_three is not None and p_again is not None and q_again is not None and failed[0]["q.ring"] is None
    rows, cols, r = reduction.compressor.shape(numel)
    p_two = _weighted_mean([reduction.compressor.local_p(v, round=5).reshape(-1) for v in vectors[:2]], weights[:2])
    tol = 1e-5 * float(p_three.abs().max())
    torch.testing.assert_close(p_again, p_three, atol=tol, rtol=0)
    assert (p_two - p_three.double()).abs().max() > 100 * tol  # a re-run that lost P would fail above
    q_locals = [reduction.compressor.local_q(v, p_again.view(rows, r)).reshape(-1) for v in vectors[:2]]
    expected = _weighted_mean(q_locals, weights[:2]).float()
    kept = torch.zeros(expected.numel(), dtype=torch.bool)
    for i in (0, 1):
        for a, b, _ in holds[i].get("q", ([], None))[0]:  # held in part: zero, unless held whole (below)
            expected[a:b] = 0.0
    for i in (0, 1):
        pieces, values = holds[i].get("q", ([], None))
        for a, b, whole in pieces:
            if whole:
                assert values is not None
                expected[a:b], kept[a:b] = values[a:b], True
    assert kept.any() and (~kept).any(), holds
    torch.testing.assert_close(q_again, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
