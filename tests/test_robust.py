"""Robust aggregation (p2pfed/robust.py): reducers drop members' copies that are not finite or break the norm bound,
and the robust rules equal plain-torch references; over real libp2p daemons, a member that sends NaN, inf or 1e30
leaves the others with the mean of the honest members. The end-to-end swarm with a faulty peer is in
tests/test_divergence.py.

.venv/bin/python -m pytest -q tests/test_robust.py
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from torch.testing import assert_close

from p2pfed.compression import Fp32, Uint8
from p2pfed.config import load_config
from p2pfed.errors import ConfigError
from p2pfed.pieces import ButterflyStats, Slice
from p2pfed.robust import CenteredClip, Guard, TrimmedMean
from tests.conftest import TINY, allreduce_all, butterfly_members


def _copies(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) for _ in range(n)]


# --- the guard and the rules against plain references ---------------------------------------------------------------


def test_guard_drops_non_finite_and_over_the_bound_and_keeps_the_rest() -> None:
    # Prepare
    ok = torch.ones(100)  # norm 10
    guard = Guard(max_norm=20.0)

    # Execute / Assert
    assert guard.check(ok) == ""
    assert guard.check(torch.where(torch.arange(100) == 3, math.nan, ok)) == "not finite"
    assert guard.check(torch.where(torch.arange(100) == 3, -math.inf, ok)) == "not finite"
    assert "over averaging.max_update_norm" in guard.check(ok * 3)  # norm 30
    assert guard.check(torch.full((10,), 1e30)) != ""  # its norm overflows fp32 but not the check
    assert Guard(max_norm=None).check(ok * 1e20) == ""


@pytest.mark.parametrize(("n", "ratio"), [(3, 0.34), (5, 0.2), (5, 0.45), (7, 0.3), (4, 0.0)])
def test_trimmed_mean_is_the_mean_of_each_coordinate_without_its_extremes(n: int, ratio: float) -> None:
    # Prepare
    copies = _copies(n, 50)
    k = min(int(ratio * n), (n - 1) // 2)

    # Execute
    got = TrimmedMean(trim_ratio=ratio).combine(copies)

    # Assert: coordinate by coordinate, in plain Python
    for c in range(50):
        values = sorted(float(x[c]) for x in copies)
        kept = values[k : n - k]
        assert got[c].item() == pytest.approx(sum(kept) / len(kept), abs=1e-6)


def test_centered_clip_matches_its_definition_and_bounds_an_outlier() -> None:
    # Prepare: four honest copies near 1, one far outlier
    honest = [torch.ones(20) + 0.01 * c for c in _copies(4, 20)]
    outlier = torch.full((20,), 1e6)
    copies = [*honest, outlier]
    rule = CenteredClip(radius=0.5, iterations=3)

    # Execute
    got = rule.combine(copies)

    # Assert: the same iteration written out member by member
    v = torch.stack(copies).median(dim=0).values
    for _ in range(3):
        step = torch.zeros(20)
        for x in copies:
            d = x - v
            step += d * min(1.0, 0.5 / max(float(d.norm()), 1e-30))
        v = v + step / len(copies)
    assert_close(got, v)
    # the outlier moves the result by at most radius / n per iteration
    assert float((got - torch.stack(honest).mean(dim=0)).norm()) < 3 * 0.5 / 5 + 0.05


def test_a_slice_drops_bad_copies_and_means_the_rest_with_their_weights() -> None:
    async def main() -> None:
        # Prepare: four members, the second sends NaN, the fourth 1e30
        copies = _copies(4, 1000)
        copies[1][5] = math.nan
        copies[3][:] = 1e30
        weights = [1.0, 2.0, 3.0, 4.0]
        stats = ButterflyStats()
        mine = Slice(peers=[], senders=4, size=1000, codec=Fp32(), round=0, stats=stats, guard=Guard(max_norm=1e4))

        # Execute
        for i, (copy, w) in enumerate(zip(copies, weights, strict=True)):
            mine.add_all(i, w, copy)
        got = mine.decode_into(torch.empty(1000))

        # Assert: the weighted mean of members 0 and 2 only, and both drops on record
        assert_close(got, (1.0 * copies[0] + 3.0 * copies[2]) / 4.0)
        assert len(stats.dropped) == 2
        assert "member 1" in stats.dropped[0] and "not finite" in stats.dropped[0]
        assert "member 3" in stats.dropped[1]

    asyncio.run(main())


def test_a_piece_whose_every_copy_is_dropped_fails_the_slice() -> None:
    async def main() -> None:
        mine = Slice(peers=[], senders=2, size=10, codec=Fp32(), round=0, stats=ButterflyStats(), guard=Guard())
        mine.add_all(0, 1.0, torch.full((10,), math.nan))
        mine.add_all(1, 1.0, torch.full((10,), math.inf))
        assert mine.done.is_set() and "dropped" in mine.error

    asyncio.run(main())


# --- over real libp2p daemons --------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [Fp32(), Uint8(seed=3)], ids=["fp32", "uint8"])
@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_a_member_sending_garbage_leaves_everyone_the_mean_of_the_honest(codec: object, bad: str) -> None:
    async def main() -> None:
        # Prepare
        vectors = _copies(3, 30_000, seed=1)
        vectors[2][::1000] = {"nan": math.nan, "inf": math.inf, "huge": 1e30}[bad]
        weights = [1.0, 3.0, 2.0]
        async with butterfly_members(3, chunk_timeout=5.0) as members:
            # Execute
            outs = await allreduce_all(
                members, b"robust", vectors, weights=weights, codec=codec, guard=Guard(max_norm=1e4)
            )

        # Assert: every member, the faulty one included, holds the honest pair's weighted mean, and it is finite
        expected = (1.0 * vectors[0] + 3.0 * vectors[1]) / 4.0
        atol = 1e-6 if isinstance(codec, Fp32) else 0.1
        for mean, stats in outs:
            assert mean is not None, stats.reason
            assert torch.isfinite(mean).all()
            assert_close(mean, expected, atol=atol, rtol=0)
        assert sum(len(s.dropped) for _, s in outs) == 3  # each reducer dropped the faulty copy of its slice

    asyncio.run(main())


def test_trimmed_mean_over_the_butterfly_equals_the_reference() -> None:
    async def main() -> None:
        vectors = _copies(3, 20_000, seed=2)
        vectors[0] *= 1000  # an outlier the median ignores
        rule = TrimmedMean(trim_ratio=0.34)
        async with butterfly_members(3, chunk_timeout=5.0) as members:
            outs = await allreduce_all(members, b"trim", vectors, codec=Fp32(), guard=Guard(), rule=rule)
        expected = torch.stack(vectors).median(dim=0).values  # 3 members, one trimmed from each end
        for mean, stats in outs:
            assert mean is not None, stats.reason
            assert_close(mean, expected)

    asyncio.run(main())


def test_robust_rules_need_sync_mode_and_a_dense_codec() -> None:
    load_config(TINY, ["averaging.aggregation=trimmed_mean"])  # sync, fp32: fine
    with pytest.raises(ConfigError, match="averaging.aggregation 'centered_clip' needs averaging.mode sync"):
        load_config(TINY, ["averaging.aggregation=centered_clip", "averaging.mode=diloco"])
    with pytest.raises(ConfigError, match="needs averaging.mode sync"):
        load_config(TINY, ["averaging.aggregation=trimmed_mean", "compression.name=topk"])
