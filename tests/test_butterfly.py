"""p2pfed's all-reduce over real libp2p daemons on loopback (one p2pd per member, in this test's process), checked
against plain-torch means: every compressor's reduction, uneven and client-mode shares, and a member that never
shows up (everyone else gets None and their vectors stay as they were).

.venv/bin/python -m pytest -q tests/test_butterfly.py
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from p2pfed import pieces as pieces_module
from p2pfed.butterfly import Butterfly, split_sizes
from p2pfed.compression import Compressor, Fp16, Fp32, PowerSGD, RandomK, Uint8
from p2pfed.config import CompressionConfig
from p2pfed.pieces import ButterflyStats
from p2pfed.reductions import Reduction, make_reduction
from tests.conftest import butterfly_members

LISTEN = ["/ip4/127.0.0.1/tcp/0"]
TIMEOUT = 30.0


def _members(n: int) -> contextlib.AbstractAsyncContextManager[list[Butterfly]]:
    return butterfly_members(n, chunk_timeout=5.0)


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _allreduce_all(
    butterflies: Sequence[Butterfly],
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    shares: Sequence[float],
    codec: Compressor,
    *,
    tag: bytes = b"group-1",
    absent: Sequence[int] = (),
    timeout: float = TIMEOUT,
) -> list[torch.Tensor | None]:
    peers = [b.p2p.peer_id for b in butterflies]
    calls = [
        b.allreduce(tag, peers, i, v, weight=w, shares=shares, codec=codec, round=7, timeout=timeout)
        for i, (b, v, w) in enumerate(zip(butterflies, vectors, weights, strict=True))
        if i not in absent
    ]
    return [mean for mean, _ in await asyncio.gather(*calls)]


async def _serve_tcp(butterflies: Sequence[Butterfly]) -> tuple[list[socket.socket], dict[Any, tuple[str, int]]]:
    """Each member also takes parts on a direct TCP listener on loopback: the listeners and the members' routes."""
    sockets, routes = [], {}
    for b in butterflies:
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        await b.serve_tcp(sock)
        sockets.append(sock)
        routes[b.p2p.peer_id] = ("127.0.0.1", sock.getsockname()[1])
    return sockets, routes


async def _tcp_round(
    butterflies: Sequence[Butterfly],
    routes: dict[Any, tuple[str, int]],
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    tag: bytes,
    *,
    codec: Compressor | None = None,
    timeout: float = TIMEOUT,
) -> list[tuple[torch.Tensor | None, Any]]:
    """One round of every member over the direct TCP routes (codec: fp32 unless given): each member's (mean, stats)."""
    peers = [b.p2p.peer_id for b in butterflies]
    calls = [
        b.allreduce(
            tag,
            peers,
            i,
            v,
            weight=w,
            shares=[1] * len(peers),
            codec=codec or Fp32(),
            round=1,
            timeout=timeout,
            routes=routes,
        )  # fmt: skip
        for i, (b, v, w) in enumerate(zip(butterflies, vectors, weights, strict=True))
    ]
    return list(await asyncio.gather(*calls))


def _vectors(n: int, numel: int) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(w * v.double() for v, w in zip(vectors, weights, strict=True))
    return (total / sum(weights)).float()  # type: ignore[union-attr]


def test_split_sizes_follow_shares_and_cover_the_vector() -> None:
    assert sorted(split_sizes(10, [1, 1, 1])) == [3, 3, 4]
    assert split_sizes(10, [1, 0, 1]) == [5, 0, 5]
    assert sum(split_sizes(1_000_003, [0.2, 0.3, 0.5])) == 1_000_003
    with pytest.raises(ValueError, match="at least one member"):
        split_sizes(10, [0, 0])


@pytest.mark.parametrize(
    ("codec", "atol"),
    [(Fp32(), 1e-6), (Fp16(), 2e-3), (Uint8(seed=1), 0.1)],
    ids=["fp32", "fp16", "uint8"],
)
def test_dense_allreduce_of_three_members_is_the_weighted_mean_on_every_member(codec: Compressor, atol: float) -> None:
    async def main() -> None:
        async with _members(3) as butterflies:
            vectors, weights = _vectors(3, 100_003), [8.0, 4.0, 12.0]
            results = await _allreduce_all(butterflies, vectors, weights, [1, 2, 1], codec)
            expected = _weighted_mean(vectors, weights)
            for mean in results:
                assert mean is not None
                assert_close(mean, expected, atol=atol, rtol=0)
            for mean in results[1:]:  # every member decodes the same replies, so all hold identical values
                assert torch.equal(mean, results[0])  # type: ignore[arg-type]

    _run(main())


def test_direct_tcp_routes_give_the_same_mean_without_the_p2p_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: pieces of 10,000 elements, so each part goes as several pieces read straight into the result (fp32)
    # or decoded into it (uint8)
    monkeypatch.setattr(pieces_module, "PIECE", 10_000)

    async def main() -> None:
        async with _members(3) as butterflies:
            sockets, routes = await _serve_tcp(butterflies)
            vectors, weights = _vectors(3, 100_003), [1.0, 2.0, 3.0]
            for codec, atol, width in ((Fp32(), 1e-6, 4), (Uint8(seed=3), 0.1, 1)):
                results = await _tcp_round(butterflies, routes, vectors, weights, repr(codec).encode(), codec=codec)
                for mean, stats in results:
                    assert mean is not None, stats.reason
                    assert_close(mean, _weighted_mean(vectors, weights), atol=atol, rtol=0)
                    assert torch.equal(mean, results[0][0])  # type: ignore[arg-type]
                    # a third to each of two reducers, and back
                    assert stats.bytes_sent > 2 * width * 100_003 * 2 // 3 - 100
            for sock in sockets:
                sock.close()

    _run(main())


def test_direct_tcp_connections_carry_later_rounds_until_the_reducer_closes_them() -> None:
    # Prepare: three members on direct TCP routes
    async def main() -> list[tuple[bool, bool]]:
        async with _members(3) as butterflies:
            sockets, routes = await _serve_tcp(butterflies)
            vectors, weights = _vectors(3, 30_001), [1.0, 2.0, 3.0]
            peers = [b.p2p.peer_id for b in butterflies]

            async def round_(tag: bytes) -> None:
                for mean, stats in await _tcp_round(butterflies, routes, vectors, weights, tag):
                    assert mean is not None, stats.reason
                    assert_close(mean, _weighted_mean(vectors, weights), atol=1e-6, rtol=0)

            def kept(sender: int, reducer: int) -> list[object]:
                return [c for c, _ in butterflies[sender]._idle[routes[peers[reducer]], None]]

            # Execute: two rounds; then the first member's side of every connection to it closes (as when its
            # process restarts), and a third round runs
            await round_(b"round-1")
            first = {(s, r): kept(s, r) for s in range(3) for r in range(3) if s != r}
            await round_(b"round-2")
            again = {(s, r): kept(s, r) for s in range(3) for r in range(3) if s != r}
            for handler in list(butterflies[0]._handlers):
                handler.cancel()
            await asyncio.sleep(0.2)
            await round_(b"round-3")
            after = {(s, r): kept(s, r) for s in range(3) for r in range(3) if s != r}
            for sock in sockets:
                sock.close()
            outcomes = []
            for pair, channels in first.items():
                assert len(channels) == 1  # one kept connection per sender and reducer
                outcomes.append((again[pair] == channels, after[pair] == channels))
            return outcomes

    outcomes = _run(main())

    # Assert: the second round used the connections of the first; the third opened new ones to the first member
    # only, whose ends had closed
    pairs = [(s, r) for s in range(3) for r in range(3) if s != r]
    assert outcomes == [(True, r != 0) for s, r in pairs]  # type: ignore[comparison-overlap]


def test_parts_travel_in_pieces_and_a_failed_piece_fails_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: pieces of 1,000 elements, so each part of ~3,300 goes as 4 pieces, replies interleaved with sends
    monkeypatch.setattr(pieces_module, "PIECE", 1000)

    async def main() -> None:
        async with _members(3) as butterflies:
            vectors, weights = _vectors(3, 10_003), [1.0, 2.0, 3.0]
            for codec, atol in ((Fp32(), 1e-6), (Uint8(seed=2), 0.1)):
                results = await _allreduce_all(
                    butterflies, vectors, weights, [1, 1, 1], codec, tag=repr(codec).encode()
                )
                for mean in results:
                    assert_close(mean, _weighted_mean(vectors, weights), atol=atol, rtol=0)
                    assert torch.equal(mean, results[0])  # type: ignore[arg-type]
            # A member whose vector is too short for the agreed split sends a bad last piece: nobody commits.
            short = [vectors[0], vectors[1], vectors[2][:-1]]
            peers = [b.p2p.peer_id for b in butterflies]
            calls = [
                b.allreduce(
                    b"bad",
                    peers,
                    i,
                    v,
                    weight=1.0,
                    shares=[1, 1, 1],
                    codec=Fp32(),
                    round=1,
                    timeout=TIMEOUT,
                )  # fmt: skip
                for i, (b, v) in enumerate(zip(butterflies, short, strict=True))
            ]
            outcomes = await asyncio.gather(*calls)
            assert [mean for mean, _ in outcomes] == [None, None, None]
            assert all(stats.reason for _, stats in outcomes)
            # the pieces before the bad one were reduced and returned: each member holds part of a failed result
            assert all(stats.held for _, stats in outcomes)

    _run(main())


def test_a_client_mode_member_reduces_nothing_but_gets_the_mean() -> None:
    async def main() -> None:
        async with _members(3) as butterflies:
            vectors, weights = _vectors(3, 5_000), [1.0, 1.0, 1.0]
            results = await _allreduce_all(butterflies, vectors, weights, [1, 1, 0], Fp32())
            for mean in results:
                assert_close(mean, _weighted_mean(vectors, weights), atol=1e-6, rtol=0)

    _run(main())


def test_a_relayed_member_reduces_its_slice_through_its_relay_and_a_false_relay_is_refused() -> None:
    async def main() -> None:
        async with _members(3) as butterflies:
            # Prepare: member 2 takes parts only as forwarded by member 0; everyone reaches member 2 through 0
            relay, _, relayed = (b.p2p.peer_id for b in butterflies)
            await butterflies[2].serve_relayed([relay])
            forwarded: list[int] = []
            butterflies[0].forwarder.on_bytes = forwarded.append
            for b in butterflies[:2]:
                b.via[relayed] = relay
            vectors, weights = _vectors(3, 30_000), [1.0, 2.0, 3.0]

            # Execute + Assert: the weighted mean everywhere; member 0 forwarded member 1's part of member 2's
            # slice and the mean coming back (a third of the vector each way) and nothing of its own
            results = await _allreduce_all(butterflies, vectors, weights, [1, 1, 1], Fp32())
            for mean in results:
                assert_close(mean, _weighted_mean(vectors, weights), atol=1e-6, rtol=0)
            assert sum(forwarded) == pytest.approx(2 * 4 * 10_000, rel=0.01)

            # Execute + Assert: member 1 is no relay of member 2's, so member 2 refuses what it forwards, and the
            # round fails for everyone
            butterflies[0].via[relayed] = butterflies[1].via[relayed] = butterflies[1].p2p.peer_id
            results = await _allreduce_all(butterflies, vectors, weights, [1, 1, 1], Fp32(), tag=b"g2", timeout=8)
            assert results == [None, None, None]

    _run(main())


def test_a_member_that_never_shows_up_fails_the_round_for_everyone_and_writes_nothing() -> None:
    async def main() -> None:
        async with _members(3) as butterflies:
            vectors = _vectors(3, 10_000)
            before = [v.clone() for v in vectors]
            peers = [b.p2p.peer_id for b in butterflies]

            async def without_the_third(tag: bytes, round: int) -> list[tuple[torch.Tensor | None, ButterflyStats]]:
                return await asyncio.gather(
                    *(
                        butterflies[i].allreduce(
                            tag,
                            peers,
                            i,
                            vectors[i],
                            weight=1.0,
                            shares=[1, 1, 1],
                            codec=Fp32(),
                            round=round,
                            timeout=6,
                        )  # fmt: skip
                        for i in (0, 1)
                    )
                )

            outcomes = await without_the_third(b"group-1", 7)
            assert [mean for mean, _ in outcomes] == [None, None]
            absent = peers[2].to_base58()
            # Each survivor names the missing member alone: the other survivor, which waits for that member's part
            # too, keeps saying so (status "waiting"), and no piece of a result reached anyone
            for _, stats in outcomes:
                assert stats.unreachable == {absent} and not stats.held
                assert not stats.not_joined  # the round's deadline came first: nothing is known of that member
            for v, b in zip(vectors, before, strict=True):
                assert torch.equal(v, b)
            # With reads' deadlines shorter than the round's, the missing member itself answers that it never started
            # that all-reduce (phases.may_retry runs such a round again instead of losing the step)
            for b in butterflies:
                b.chunk_timeout = 1.0
            outcomes = await without_the_third(b"group-3", 8)
            assert [mean for mean, _ in outcomes] == [None, None]
            for _, stats in outcomes:
                assert stats.unreachable == stats.not_joined == {absent} and not stats.held, stats
            # The same members average fine in the next round: nothing of the failed ones lingers.
            results = await _allreduce_all(butterflies, vectors, [1.0] * 3, [1, 1, 1], Fp32(), tag=b"group-2")
            for mean in results:
                assert_close(mean, _weighted_mean(vectors, [1.0] * 3), atol=1e-6, rtol=0)

    _run(main())


def _reference(
    name: str, vectors: Sequence[torch.Tensor], *, round: int, q: torch.Tensor | None = None
) -> torch.Tensor:
    """What the group should get, computed with plain torch from the compressor's own definition. PowerSGD: `q`
    (cols, r) is this round's Q, overwritten with the next round's (the group's mean Q)."""
    numel = vectors[0].numel()
    if name == "randomk":
        chosen = RandomK(ratio=0.05, seed=3).indices(numel, round=round)
        out = torch.zeros(numel)
        out[chosen] = torch.stack([v[chosen] for v in vectors]).mean(0)
        return out
    if name == "topk":
        kept = []
        for v in vectors:
            k = round_half(0.05 * numel)
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[v.abs().topk(k).indices] = True
            kept.append(torch.where(mask, v, 0.0))
        return torch.stack(kept).mean(0)
    assert name == "powersgd" and q is not None
    rows, cols, r = PowerSGD(rank=2).shape(numel)
    ms = [torch.nn.functional.pad(v, (0, rows * cols - numel)).view(rows, cols) for v in vectors]
    p_hat = torch.linalg.qr(torch.stack([m @ q for m in ms]).mean(0)).Q
    q_mean = torch.stack([m.T @ p_hat for m in ms]).mean(0)
    q.copy_(q_mean)  # warm start: the next round's Q
    return (p_hat @ q_mean.T).reshape(-1)[:numel]


def round_half(x: float) -> int:
    return int(x + 0.5)


def _seeded(seed: int, round: int) -> torch.Generator:
    from p2pfed.compression.base import seeded_generator

    return seeded_generator(seed, round, "powersgd")


@pytest.mark.parametrize("name", ["randomk", "topk", "powersgd"])
def test_compressed_reductions_match_their_plain_torch_definition(name: str) -> None:
    async def main() -> None:
        async with _members(3) as butterflies:
            vectors = _vectors(3, 20_000)
            cfg = CompressionConfig(name=name, ratio=0.05, rank=2, error_feedback=True)  # type: ignore[arg-type]
            reductions = [make_reduction(cfg, seed=3, peer_seed=i) for i in range(3)]
            peers = [b.p2p.peer_id for b in butterflies]

            async def run(i: int, reduction: Reduction, round: int) -> torch.Tensor | None:
                async def allreduce(vector: torch.Tensor, codec: Compressor, phase: str) -> torch.Tensor | None:
                    tag = f"r{round}-{phase}".encode()
                    mean, _ = await butterflies[i].allreduce(
                        tag, peers, i, vector, weight=1.0, shares=[1, 1, 1], codec=codec, round=round, timeout=TIMEOUT
                    )
                    return mean

                return await reduction.run(vectors[i], allreduce, round=round)

            results = await asyncio.gather(*(run(i, r, 5) for i, r in enumerate(reductions)))
            # PowerSGD's first Q is drawn from the shared seed (round 0); each later one is the group's last mean Q
            _, cols, rank = PowerSGD(rank=2).shape(vectors[0].numel())
            q = torch.randn(cols, rank, generator=_seeded(3, 0))
            expected = _reference(name, vectors, round=5, q=q)
            for mean in results:
                assert_close(mean, expected, atol=1e-5, rtol=1e-4)
            # Error feedback: each member keeps what its compression dropped this round...
            residuals = [r.feedback.residual for r in reductions]  # type: ignore[attr-defined]
            for v, residual in zip(vectors, residuals, strict=True):
                assert residual is not None and residual.numel() == v.numel()
                assert 0 < float(residual.norm()) < float(v.norm())
            # ...and the next round compresses its update plus that residual.
            second = await asyncio.gather(*(run(i, r, 6) for i, r in enumerate(reductions)))
            corrected = [v + res for v, res in zip(vectors, residuals, strict=True)]
            expected = _reference(name, corrected, round=6, q=q)
            for mean in second:
                assert_close(mean, expected, atol=1e-5, rtol=1e-4)

    _run(main())


def test_topk_wire_form_is_sparse() -> None:
    from p2pfed.compression.sparse import Sparse

    x = torch.zeros(10_000)
    x[[3, 500, 9_999]] = torch.tensor([1.0, -2.0, 3.0])
    payload = Sparse().compress(x, round=0)
    assert payload.nbytes < 40
    assert torch.equal(Sparse().decompress(payload, numel=10_000, round=0), x)
    dense = torch.randn(100)
    assert torch.equal(Sparse().decompress(Sparse().compress(dense, round=0), numel=100, round=0), dense)


def test_hierarchical_allreduce_is_the_flat_weighted_mean_and_only_delegates_cross_clouds() -> None:
    from p2pfed.hierarchy import Member, delegates, hierarchical_allreduce

    async def main() -> None:
        async with _members(4) as butterflies:
            clouds, weights = ["aws", "gcp", "aws", "gcp"], [8.0, 4.0, 12.0, 2.0]
            shares = [1.0, 0.0, 1.0, 1.0]  # the first gcp member only dials out: the other one is gcp's delegate
            members = [
                Member(b.p2p.peer_id, c, w, s) for b, c, w, s in zip(butterflies, clouds, weights, shares, strict=True)
            ]
            assert delegates(members) == {"aws": 0, "gcp": 3}
            vectors = _vectors(4, 30_001)
            calls = [
                hierarchical_allreduce(b, b"round-1", members, i, vectors[i], codec=Fp16(), round=1, timeout=TIMEOUT)
                for i, b in enumerate(butterflies)
            ]
            results = await asyncio.gather(*calls)
            expected = _weighted_mean(vectors, weights)
            for mean, _ in results:
                assert_close(mean, expected, atol=2e-3, rtol=0)  # fp16 on the cross-cloud leg only
                assert torch.equal(mean, results[0][0])  # type: ignore[arg-type]
            cloud_of = {m.peer.to_base58(): m.cloud for m in members}
            for i, (_, stats) in enumerate(results):
                remote = {cloud_of[p] for p in stats.sent_by_peer}
                if i in (0, 3):  # delegates: their own cloud and the other one
                    assert remote == {"aws", "gcp"}
                else:  # everyone else talks only inside its cloud
                    assert remote == {clouds[i]}

    _run(main())


def test_direct_tcp_sealed_with_the_swarm_key_averages_and_refuses_other_keys_and_clear_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: three members on direct TCP routes, each connection sealed with the run's key (privacy.swarm_key)
    async def main() -> tuple[list[object], list[object], bool]:
        async with _members(3) as butterflies:
            for b in butterflies:
                b.seal_key = bytes(range(32))
            sockets, routes = await _serve_tcp(butterflies)
            vectors, weights = _vectors(3, 300_007), [1.0, 2.0, 3.0]
            peers = [b.p2p.peer_id for b in butterflies]

            async def round_(tag: bytes, timeout: float) -> list[object]:
                results = await _tcp_round(butterflies, routes, vectors, weights, tag, timeout=timeout)
                return [mean for mean, _ in results]

            sealed = await round_(b"sealed", TIMEOUT)
            butterflies[2].seal_key = bytes(32)  # a member whose key is not the swarm's
            intruded = await round_(b"intruder", 3.0)
            # a connection that does not open sealed, with a well-formed request
            reader, writer = await asyncio.open_connection(*routes[peers[0]])
            writer.write(b"P2PF" + b"\x00" * 16)
            await writer.drain()
            try:
                closed = await asyncio.wait_for(reader.read(100), 5.0) == b""  # closed without a reply
            except ConnectionResetError:
                closed = True
            writer.close()
            for sock in sockets:
                sock.close()
            return sealed, intruded, closed

    with caplog.at_level("WARNING", logger="p2pfed.butterfly"):
        sealed, intruded, closed = _run(main())  # type: ignore[misc]

    # Assert: sealed, the exact weighted mean; with another key in the group, nobody gets a mean (the intruder
    # included), and the reducers say why in one line; clear bytes are refused without a reply
    vectors = _vectors(3, 300_007)
    for mean in sealed:
        assert isinstance(mean, torch.Tensor)
        assert_close(mean, _weighted_mean(vectors, [1.0, 2.0, 3.0]), atol=1e-6, rtol=0)
    assert intruded == [None, None, None]
    refusals = [r.getMessage() for r in caplog.records if "refused a direct TCP averaging connection" in r.getMessage()]
    assert any("not sealed with this swarm's key" in m for m in refusals), refusals
    assert any("it is not sealed" in m for m in refusals), refusals
    assert closed
