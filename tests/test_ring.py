"""The ring all-reduce (averaging.schedule: ring) over real libp2p daemons and direct TCP on loopback, checked against
plain-torch weighted means: every elementwise codec within its bound, identical results on every member, a member's
own bad update left out, a member that never shows up, and kept connections shared with the butterfly.

.venv/bin/python -m pytest -q tests/test_ring.py
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from p2pfed import ring as ring_module
from p2pfed.butterfly import Butterfly
from p2pfed.compression import Compressor, Fp16, Fp32, Uint8
from p2pfed.config import ConfigError, load_config
from p2pfed.pieces import ButterflyStats
from p2pfed.robust import Guard
from tests.conftest import TINY, butterfly_members

Outcome = tuple[torch.Tensor | None, ButterflyStats]


async def _serve_tcp(butterflies: Sequence[Butterfly]) -> dict[Any, tuple[str, int]]:
    routes = {}
    for b in butterflies:
        sock = socket.create_server(("127.0.0.1", 0))
        await b.serve_tcp(sock)
        routes[b.p2p.peer_id] = ("127.0.0.1", sock.getsockname()[1])
    return routes


async def _ring(
    butterflies: Sequence[Butterfly],
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    tag: bytes,
    *,
    codec: Compressor | None = None,
    routes: dict[Any, tuple[str, int]] | None = None,
    members: Sequence[int] | None = None,
    timeout: float = 30.0,
    guard: Guard | None = None,
) -> list[Outcome]:
    """One ring round of `members` (default: all) of the group of all `butterflies`: each one's (mean, stats)."""
    peers = [b.p2p.peer_id for b in butterflies]
    calls = [
        butterflies[i].ring_allreduce(
            tag,
            peers,
            i,
            vectors[i],
            weight=weights[i],
            codec=codec or Fp32(),
            round=3,
            timeout=timeout,
            routes=routes,
            guard=guard,
        )  # fmt: skip
        for i in (range(len(butterflies)) if members is None else members)
    ]
    return list(await asyncio.gather(*calls))


def _vectors(n: int, numel: int) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def _weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(w * v.double() for v, w in zip(vectors, weights, strict=True))
    return (total / sum(weights)).float()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("codec", "transport"),
    [(Fp32(), "libp2p"), (Fp32(), "tcp"), (Fp16(), "tcp"), (Uint8(), "tcp")],
    ids=["fp32-libp2p", "fp32-tcp", "fp16-tcp", "uint8-tcp"],
)
def test_ring_allreduce_of_four_members_is_the_weighted_mean_on_every_member(
    codec: Compressor, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: four members (two hops of running means), chunks of several pieces each, uneven weights
    monkeypatch.setattr(ring_module, "PIECE", 7_000)
    vectors, weights = _vectors(4, 50_003), [1.0, 2.0, 3.0, 0.5]
    exact = _weighted_mean(vectors, weights)
    spread = max(float(v.max() - v.min()) for v in vectors)
    # fp16: one rounding per hop, relative; 8-bit: under one level of a chunk's range per hop and for the mean
    atol = {Fp32: 1e-6, Fp16: 4 * 2e-3, Uint8: 4 * spread / 255}[type(codec)]

    async def main() -> list[Outcome]:
        async with butterfly_members(4, chunk_timeout=5.0) as butterflies:
            routes = await _serve_tcp(butterflies) if transport == "tcp" else None
            return await _ring(butterflies, vectors, weights, b"ring-1", codec=codec, routes=routes)

    # Execute
    outcomes = asyncio.run(main())

    # Assert: the plain-torch weighted mean within the codec's bound, the same values on every member
    for mean, stats in outcomes:
        assert mean is not None, stats.reason
        assert_close(mean, exact, atol=atol, rtol=0)
        assert torch.equal(mean, outcomes[0][0])  # type: ignore[arg-type]
        # 2 (n - 1) / n of the vector goes out, as in the butterfly
        assert stats.bytes_sent >= 2 * 3 / 4 * codec.compress(vectors[0], round=0).nbytes * 0.99
        assert not stats.unreachable and not stats.dropped
    if not isinstance(codec, Fp32):  # a lossy codec does lose something: the bound is not vacuous
        assert float((outcomes[0][0] - exact).abs().max()) > 1e-6  # type: ignore[operator]


def test_a_member_whose_own_update_fails_its_check_joins_with_nothing_and_the_others_average() -> None:
    # Prepare: the second member's update has a NaN, the third's is over the norm bound
    vectors, weights = _vectors(4, 20_000), [1.0, 1.0, 1.0, 2.0]
    vectors[1][123] = float("nan")
    vectors[2] *= 1e3
    guard = Guard(max_norm=1e3)

    async def main() -> list[Outcome]:
        async with butterfly_members(4, chunk_timeout=5.0) as butterflies:
            return await _ring(butterflies, vectors, weights, b"ring-guard", guard=guard)

    # Execute
    outcomes = asyncio.run(main())

    # Assert: every member gets the weighted mean of the two good updates; the two others say why they are out
    exact = _weighted_mean([vectors[0], vectors[3]], [1.0, 2.0])
    for i, (mean, stats) in enumerate(outcomes):
        assert mean is not None, stats.reason
        assert_close(mean, exact, atol=1e-6, rtol=0)
        assert bool(stats.dropped) == (i in (1, 2)), stats.dropped
    assert "not finite" in outcomes[1][1].dropped[0] and "max_update_norm" in outcomes[2][1].dropped[0]


def test_a_member_that_never_shows_up_fails_the_ring_for_everyone_and_names_it() -> None:
    # Prepare: three members, the third never starts the round
    vectors = _vectors(3, 10_000)
    before = [v.clone() for v in vectors]

    async def main() -> tuple[list[Outcome], list[Outcome], str]:
        async with butterfly_members(3, chunk_timeout=1.0) as butterflies:
            routes = await _serve_tcp(butterflies)
            missing = await _ring(butterflies, vectors, [1.0] * 3, b"ring-2", routes=routes, members=(0, 1), timeout=8)
            again = await _ring(butterflies, vectors, [1.0] * 3, b"ring-3", routes=routes)
            return missing, again, butterflies[2].p2p.peer_id.to_base58()

    # Execute
    missing, again, absent = asyncio.run(main())

    # Assert: both survivors fail, within the deadline, and name the missing member alone as one that never started
    # the round (so both may run it again, p2pfed/phases.py): the one that sends to it hears so, and tells the other,
    # whose stream from it never came. The vectors are untouched, and the next round of all three averages.
    for mean, stats in missing:
        assert mean is None and stats.reason
        assert stats.unreachable == stats.not_joined == {absent}, stats
    for v, b in zip(vectors, before, strict=True):
        assert torch.equal(v, b)
    for mean, stats in again:
        assert mean is not None, stats.reason
        assert_close(mean, _weighted_mean(vectors, [1.0] * 3), atol=1e-6, rtol=0)


def test_ring_and_butterfly_rounds_share_kept_direct_tcp_connections() -> None:
    # Prepare: three members on direct TCP
    vectors, weights = _vectors(3, 30_001), [1.0, 2.0, 3.0]
    exact = _weighted_mean(vectors, weights)

    async def main() -> list[list[Outcome]]:
        async with butterfly_members(3, chunk_timeout=5.0) as butterflies:
            routes = await _serve_tcp(butterflies)
            peers = [b.p2p.peer_id for b in butterflies]
            rounds = [await _ring(butterflies, vectors, weights, b"ring-a", routes=routes)]
            # each member's one connection, to the next member, is kept
            kept = [butterflies[i]._idle[routes[peers[(i + 1) % 3]], None][0][0] for i in range(3)]
            rounds.append(
                await asyncio.gather(
                    *(
                        b.allreduce(
                            b"fly-b",
                            peers,
                            i,
                            vectors[i],
                            weight=weights[i],
                            shares=[1, 1, 1],
                            codec=Fp32(),
                            round=1,
                            timeout=30,
                            routes=routes,
                        )  # fmt: skip
                        for i, b in enumerate(butterflies)
                    )
                )
            )
            rounds.append(await _ring(butterflies, vectors, weights, b"ring-c", routes=routes))
            # the butterfly took each kept ring connection for one of its exchanges, and the ring took it back
            for i in range(3):
                assert any(c is kept[i] for c, _ in butterflies[i]._idle[routes[peers[(i + 1) % 3]], None])
            return rounds

    # Execute
    rounds = asyncio.run(main())

    # Assert: every round, ring or butterfly, on connections the other one used, gives the weighted mean
    for outcomes in rounds:
        for mean, stats in outcomes:
            assert mean is not None, stats.reason
            assert_close(mean, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("conflict", ["averaging.aggregation=trimmed_mean", "privacy.secure_aggregation=true"])
def test_a_ring_schedule_refuses_what_needs_each_members_own_update(conflict: str) -> None:
    modes = ("averaging.mode=diloco", "averaging.mode=gossip", "averaging.mode=hierarchical")
    for ok in (*modes, "compression.name=uint8", "compression.name=topk"):
        assert load_config(TINY, ["averaging.schedule=ring", ok]).averaging.schedule == "ring"
    with pytest.raises(ConfigError, match="averaging.schedule 'ring' needs averaging.aggregation mean and privacy"):
        load_config(TINY, ["averaging.schedule=ring", conflict])


@pytest.mark.parametrize("transport", ["tcp", "libp2p"])
def test_a_member_that_dies_mid_round_is_named_by_every_survivor_at_once(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: four members, a vector large enough that the round is still under way when the third member's
    # connections all drop at once, as when its machine dies (nothing more leaves it)
    monkeypatch.setattr(ring_module, "PIECE", 20_000)
    vectors = _vectors(4, 4_000_000)
    before = [v.clone() for v in vectors]

    async def main() -> tuple[list[Outcome], float, str]:
        async with butterfly_members(4, chunk_timeout=5.0) as butterflies:
            routes = await _serve_tcp(butterflies) if transport == "tcp" else None
            peers = [b.p2p.peer_id for b in butterflies]
            dying = butterflies[2]
            loop = asyncio.get_running_loop()
            start = loop.time()
            calls = [
                asyncio.ensure_future(
                    b.ring_allreduce(
                        b"ring-die", peers, i, vectors[i], weight=1.0, codec=Fp32(), round=1, timeout=30, routes=routes
                    )  # fmt: skip
                )
                for i, b in enumerate(butterflies)
            ]
            while b"ring-die" not in dying._rings or dying._rings[b"ring-die"].result()._frame_in < 3:
                await asyncio.sleep(0.001)
            ring = dying._rings[b"ring-die"].result()
            assert ring.outgoing is not None and not any(c.done() for c in calls)  # the round is under way
            for channel in (ring.incoming.result(), ring.outgoing):
                if transport == "tcp":
                    channel.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
                else:  # its end of each libp2p stream, cut
                    channel.writer.transport.abort()  # type: ignore[attr-defined]
            calls[2].cancel()
            outcomes = await asyncio.gather(*(calls[i] for i in (0, 1, 3)))
            return outcomes, loop.time() - start, peers[2].to_base58()

    # Execute
    outcomes, elapsed, dead = asyncio.run(main())

    # Assert: every survivor fails the round, names the dead member alone (so all three re-form the same group),
    # within moments rather than at a deadline; their vectors are untouched
    for mean, stats in outcomes:
        assert mean is None and stats.reason
        assert stats.unreachable == {dead} and not stats.not_joined, stats
    assert elapsed < 1.5  # a third of a read's deadline: nobody waited one out
    for v, b in zip(vectors, before, strict=True):
        assert torch.equal(v, b)


def test_hierarchical_delegates_go_around_a_ring_across_three_clouds() -> None:
    from p2pfed.hierarchy import Member, delegates, hierarchical_allreduce

    # Prepare: five members in three clouds, uneven weights; the delegates are the first of each cloud
    clouds, weights = ["aws", "gcp", "aws", "azure", "gcp"], [8.0, 4.0, 12.0, 2.0, 6.0]
    vectors = _vectors(5, 30_001)

    async def main() -> tuple[list[Outcome], list[Member]]:
        async with butterfly_members(5, chunk_timeout=5.0) as butterflies:
            members = [Member(b.p2p.peer_id, c, w, 1.0) for b, c, w in zip(butterflies, clouds, weights, strict=True)]
            assert delegates(members) == {"aws": 0, "gcp": 1, "azure": 3}
            calls = [
                hierarchical_allreduce(
                    b, b"round-h", members, i, vectors[i], codec=Fp16(), round=1, timeout=30, ring=True
                )
                for i, b in enumerate(butterflies)
            ]
            return list(await asyncio.gather(*calls)), members

    # Execute
    results, members = asyncio.run(main())

    # Assert: the flat weighted mean (fp16 on the cross-cloud leg only), the same on every member; each delegate
    # sends across clouds to one other cloud only, the next delegate around the ring (a butterfly would reach both)
    expected = _weighted_mean(vectors, weights)
    cloud_of = {m.peer.to_base58(): m.cloud for m in members}
    for i, (mean, stats) in enumerate(results):
        assert mean is not None, stats.reason
        assert_close(mean, expected, atol=4e-3, rtol=0)
        assert torch.equal(mean, results[0][0])  # type: ignore[arg-type]
        crossed = {cloud_of[p] for p in stats.sent_by_peer} - {clouds[i]}
        assert len(crossed) == (1 if i in (0, 1, 3) else 0), (i, crossed)


def test_ring_over_sealed_direct_tcp_averages_and_a_member_with_another_key_fails_it() -> None:
    # Prepare: three members on direct TCP sealed with the run's key (privacy.swarm_key), frames of several pieces
    vectors, weights = _vectors(3, 100_003), [1.0, 2.0, 3.0]

    async def main() -> tuple[list[Outcome], list[Outcome]]:
        async with butterfly_members(3, chunk_timeout=1.0) as butterflies:
            for b in butterflies:
                b.seal_key = bytes(range(32))
            routes = await _serve_tcp(butterflies)
            sealed = await _ring(butterflies, vectors, weights, b"ring-sealed", routes=routes)
            butterflies[1].seal_key = bytes(32)  # a member whose key is not the swarm's
            intruded = await _ring(butterflies, vectors, weights, b"ring-intruder", routes=routes, timeout=6)
            return sealed, intruded

    # Execute
    sealed, intruded = asyncio.run(main())

    # Assert: sealed, the exact weighted mean on every member; with another key in the ring, nobody gets a mean
    for mean, stats in sealed:
        assert mean is not None, stats.reason
        assert_close(mean, _weighted_mean(vectors, weights), atol=1e-6, rtol=0)
    for mean, stats in intruded:
        assert mean is None and stats.reason
