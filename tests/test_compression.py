"""Compressors for averaging: round trips within each documented bound, wire sizes from their formulas, averaging in
the compressed domain, error feedback, and the registry. CPU only, no network, a few seconds.

.venv/bin/python -m pytest -q tests/test_compression.py
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from p2pfed.compression import (
    COMPRESSORS,
    Compressor,
    ErrorFeedback,
    Fp16,
    Fp32,
    Payload,
    PowerSGD,
    RandomK,
    TopK,
    Uint8,
    make_compressor,
)
from p2pfed.compression import topk as topk_module
from p2pfed.compression.topk import largest_magnitudes

SIZES = [1, 7, 1023, 1025, 100_003]
EPS = torch.finfo(torch.float32).eps
H = Payload.HEADER_ITEM_BYTES


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _round_trip(compressor: Compressor, x: torch.Tensor, *, round: int = 0) -> torch.Tensor:
    return compressor.decompress(compressor.compress(x, round=round), numel=x.numel(), round=round)


def _kept(ratio: float, numel: int) -> int:
    """The documented keep count: ratio * numel rounded to nearest, at least 1, at most numel."""
    return min(numel, max(1, math.floor(ratio * numel + 0.5)))


def _uint8_reference(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: its chunk's scale (max - min) / 255, and an fp32 slack of 4 ulps of the chunk's largest |x|."""
    pieces = x.split(chunk)
    scale = torch.cat([((p.max() - p.min()) / 255).expand(p.numel()) for p in pieces])
    slack = torch.cat([(4 * EPS * p.abs().max()).expand(p.numel()) for p in pieces])
    return scale, slack


# --- round trips ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_every_compressor_restores_a_flat_fp32_vector_of_the_input_size(name: str, numel: int) -> None:
    # Prepare
    compressor = make_compressor(name)
    x = _randn(numel)

    # Execute
    out = _round_trip(compressor, x)

    # Assert
    assert out.shape == (numel,)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("numel", SIZES)
def test_none_is_exact(numel: int) -> None:
    x = _randn(numel)
    assert torch.equal(_round_trip(Fp32(), x), x)


@pytest.mark.parametrize("numel", SIZES)
def test_fp16_is_within_half_an_fp16_ulp(numel: int) -> None:
    # Prepare: magnitudes from fp16's subnormals (1e-7) to near its top (1e4)
    x = _randn(numel) * torch.logspace(-7, 4, numel)

    # Execute
    out = _round_trip(Fp16(), x)

    # Assert: the documented bound, and the plain-torch cast it stands for
    assert_close(out, x, rtol=2**-11, atol=2**-25)
    assert torch.equal(out, x.half().float())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("numel", SIZES)
def test_uint8_is_within_its_per_chunk_bound(numel: int, rounding: str) -> None:
    # Prepare: all values near 10, so a partial last chunk padded with zeros would have too wide a range
    x = _randn(numel) + 10
    scale, slack = _uint8_reference(x, chunk=1024)
    bound = scale / 2 if rounding == "nearest" else scale

    # Execute
    out = _round_trip(Uint8(rounding=rounding), x)

    # Assert
    excess = (out - x).abs() - (bound + slack)
    assert bool((excess <= 0).all()), f"bound exceeded by up to {excess.max().item():.3g}"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_uint8_keeps_an_outlier_that_clamping_to_three_sigma_would_lose(rounding: str) -> None:
    # Prepare: one 1e4 among N(0, 1) values; a clamp to mean ± 3 std (about 470 here) would cut it by 95%
    x = _randn(4096)
    x[1234] = 1e4
    scale, slack = _uint8_reference(x, chunk=1024)
    bound = scale / 2 if rounding == "nearest" else scale

    # Execute
    out = _round_trip(Uint8(rounding=rounding), x)

    # Assert: the outlier is restored within its chunk's bound, far above any 3-sigma clamp
    assert abs(out[1234].item() - 1e4) <= (bound + slack)[1234].item()
    assert out[1234].item() > 10 * (x.mean() + 3 * x.std()).item()
    assert bool(((out - x).abs() <= bound + slack).all())


def test_uint8_stochastic_rounding_is_unbiased() -> None:
    # Prepare
    rounds, chunk = 1000, 64
    x = _randn(1000)
    scale, slack = _uint8_reference(x, chunk)
    # Each round's error lies in an interval of width `scale` around a mean of 0 (if unbiased). Hoeffding and a union
    # bound over the coordinates: |mean error| <= tol for all of them, except with probability 1e-6.
    tol = scale * math.sqrt(math.log(2 * x.numel() / 1e-6) / (2 * rounds)) + slack

    # Execute
    compressor = Uint8(chunk=chunk, rounding="stochastic", seed=7)
    mean = torch.stack([_round_trip(compressor, x, round=r) for r in range(rounds)]).mean(dim=0)
    nearest = _round_trip(Uint8(chunk=chunk, rounding="nearest"), x)

    # Assert: stochastic rounding converges to x; nearest rounding's fixed bias does not fit the same tolerance
    assert bool(((mean - x).abs() <= tol).all())
    assert bool(((nearest - x).abs() > tol).any())


def test_uint8_stochastic_rounding_is_reproducible_per_seed_and_round() -> None:
    x = _randn(3000)
    first = Uint8(seed=3).compress(x, round=5)
    assert Uint8(seed=3).compress(x, round=5) == first
    assert Uint8(seed=3).compress(x, round=6).data != first.data
    assert Uint8(seed=4).compress(x, round=5).data != first.data


@pytest.mark.parametrize("numel", SIZES)
def test_randomk_restores_exactly_the_chosen_coordinates_and_zeros_elsewhere(numel: int) -> None:
    # Prepare
    compressor = RandomK(ratio=0.1, seed=11)
    x = _randn(numel)

    # Execute
    out = _round_trip(compressor, x, round=3)
    chosen = compressor.indices(numel, round=3)

    # Assert
    assert chosen.numel() == _kept(0.1, numel) == chosen.unique().numel()
    expected = torch.zeros(numel)
    expected[chosen] = x[chosen]
    assert torch.equal(out, expected)


def test_randomk_peers_with_one_seed_pick_the_same_coordinates_and_a_new_round_new_ones() -> None:
    # Prepare: two peers with their own data and their own compressor instance
    peer_a, peer_b = RandomK(ratio=0.05, seed=42), RandomK(ratio=0.05, seed=42)
    x_a, x_b = _randn(2000, seed=1), _randn(2000, seed=2)

    # Execute
    support_a = _round_trip(peer_a, x_a, round=9) != 0
    support_b = _round_trip(peer_b, x_b, round=9) != 0
    next_round = peer_a.indices(2000, round=10)
    other_seed = RandomK(ratio=0.05, seed=43).indices(2000, round=9)

    # Assert
    assert torch.equal(support_a, support_b)
    assert torch.equal(peer_a.indices(2000, round=9), support_a.nonzero().flatten())
    assert not torch.equal(next_round, peer_a.indices(2000, round=9))
    assert not torch.equal(other_seed, peer_a.indices(2000, round=9))


def test_randomk_scale_multiplies_by_numel_over_k_and_is_unbiased() -> None:
    # Prepare
    numel, ratio, rounds = 50, 0.2, 2000
    compressor = RandomK(ratio=ratio, scale=True)
    x = _randn(numel)
    k = _kept(ratio, numel)

    # Execute
    outs = torch.stack([_round_trip(compressor, x, round=r) for r in range(rounds)])  # (rounds, numel)

    # Assert: kept values are x * numel / k; each round's estimate lies in [0, x numel / k] (or the reverse), so
    # Hoeffding with a union bound over coordinates gives the tolerance on the mean (failure probability 1e-6).
    chosen = compressor.indices(numel, round=0)
    assert_close(outs[0][chosen], x[chosen] * (numel / k))
    tol = x.abs() * (numel / k) * math.sqrt(math.log(2 * numel / 1e-6) / (2 * rounds))
    assert bool(((outs.mean(dim=0) - x).abs() <= tol).all())


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("numel", SIZES)
def test_topk_keeps_exactly_the_k_largest_magnitudes(numel: int, value_dtype: str) -> None:
    # Prepare
    x = _randn(numel)
    k = _kept(0.05, numel)
    largest = x.abs().argsort(descending=True)[:k]
    expected = torch.zeros(numel)
    expected[largest] = x[largest] if value_dtype == "fp32" else x[largest].half().float()

    # Execute
    out = _round_trip(TopK(ratio=0.05, value_dtype=value_dtype), x)

    # Assert
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", ["normal", "heavy-tailed", "mostly-zero", "ties"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_topk_selection_through_candidates_is_the_exact_k_largest(shape: str, ratio: float) -> None:
    # Prepare: vectors large enough for the sampled threshold, of shapes a sample may misjudge
    numel = 300_007
    x = _randn(numel, seed=3)
    if shape == "heavy-tailed":
        x = x / _randn(numel, seed=4)  # Cauchy-like: a few huge magnitudes
    elif shape == "mostly-zero":
        x[torch.randperm(numel, generator=torch.Generator().manual_seed(5))[: numel - 2000]] = 0.0
    elif shape == "ties":
        x = x.sign() * (x.abs() * 4).floor()  # few distinct magnitudes
    k = _kept(ratio, numel)

    # Execute
    chosen = largest_magnitudes(x, k)

    # Assert: k ascending indices whose magnitudes are the k largest (any tie at the k-th may be broken either way)
    assert chosen.numel() == k and bool((chosen.diff() > 0).all())
    kth = x.abs().topk(k).values[-1]
    assert bool((x.abs()[chosen] >= kth).all())
    outside = torch.ones(numel, dtype=torch.bool)
    outside[chosen] = False
    assert bool((x.abs()[outside] <= kth).all())


def test_topk_selection_falls_back_to_the_whole_vector_when_too_few_pass_the_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a threshold that nothing reaches
    x = _randn(300_007, seed=6)
    k = 3000
    monkeypatch.setattr(topk_module, "candidate_threshold", lambda magnitudes, k: float("inf"))

    # Execute
    chosen = largest_magnitudes(x, k)

    # Assert
    assert torch.equal(chosen, x.abs().topk(k).indices.sort().values)


# --- PowerSGD ---------------------------------------------------------------------------------------------------------

# QR and the two products each add a few eps * sqrt(inner size) of relative error; 100 eps leaves room for that,
# while a wrong basis errs by O(1).
LOW_RANK_TOL = 100 * EPS


def _relative_error(out: torch.Tensor, x: torch.Tensor) -> float:
    return ((out - x).norm() / x.norm()).item()


@pytest.mark.parametrize("numel", [3000, 4096, 100_003])
def test_powersgd_restores_an_exactly_rank_r_matrix(numel: int) -> None:
    # Prepare: M = A Bᵀ in the compressor's own (rows, cols) layout; a zero last row of A makes the zero padding of a
    # vector that does not fill the matrix part of M, so M keeps rank r
    compressor = PowerSGD(rank=4)
    rows, cols, r = compressor.shape(numel)
    a, b = _randn(rows, r, seed=1), _randn(cols, r, seed=2)
    if rows * cols > numel:
        a[-1] = 0
    x = (a @ b.T).reshape(-1)[:numel]

    # Execute: three warm-started rounds
    errors = [_relative_error(_round_trip(compressor, x, round=t), x) for t in range(3)]

    # Assert
    assert max(errors) <= LOW_RANK_TOL, errors


def test_powersgd_round_is_one_power_step_from_the_last_q() -> None:
    # Prepare
    compressor = PowerSGD(rank=3)
    x = _randn(100_003)
    rows, cols, r = compressor.shape(x.numel())
    m = torch.nn.functional.pad(x, (0, rows * cols - x.numel())).view(rows, cols)
    compressor.compress(x, round=0)
    assert compressor.warm_q is not None
    q = compressor.warm_q.clone().view(cols, r)

    # Execute
    out = _round_trip(compressor, x, round=1)

    # Assert: plain-torch P̂ P̂ᵀ M with P̂ = orthonormal basis of M Q
    p_hat = torch.linalg.qr(m @ q).Q
    assert_close(out, (p_hat @ p_hat.T @ m).reshape(-1)[: x.numel()], rtol=1e-4, atol=1e-5)


def test_powersgd_error_on_random_data_lies_between_the_svd_error_and_the_projection_bound() -> None:
    # Prepare
    compressor = PowerSGD(rank=4)
    x = _randn(100_003)
    rows, cols, r = compressor.shape(x.numel())
    m = torch.nn.functional.pad(x, (0, rows * cols - x.numel())).view(rows, cols)
    sigma = torch.linalg.svdvals(m.double())
    best = sigma[r:].square().sum().sqrt().item()  # Eckart-Young: the least error of any rank-r matrix
    # x̂ = P̂ P̂ᵀ M is an orthogonal projection of M, so its error is at most ||M||_F = best * factor, where
    # factor = 1 / sqrt(1 - sum_{i<=r} sigma_i² / ||M||²): small because on N(0, 1) data no r directions hold
    # much of the energy (about 4 r / min(rows, cols) of it, by Marchenko-Pastur).
    factor = m.norm().item() / best

    # Execute
    error = (_round_trip(compressor, x) - x).norm().item()

    # Assert
    assert factor < 1.05
    assert best * (1 - 1e-5) <= error <= best * factor * (1 + 1e-5)


def test_powersgd_warm_start_converges_to_the_svd_error() -> None:
    # Prepare: a 64 x 64 matrix with singular values 0.7^i, so sigma_5 / sigma_4 = 0.7 and each round shrinks the
    # distance to the best rank-4 subspace by about that factor
    u, _ = torch.linalg.qr(_randn(64, 64, seed=1))
    v, _ = torch.linalg.qr(_randn(64, 64, seed=2))
    sigma = 0.7 ** torch.arange(64.0)
    x = (u @ torch.diag(sigma) @ v.T).reshape(-1)
    best = sigma[4:].square().sum().sqrt().item()
    compressor = PowerSGD(rank=4)

    # Execute
    errors = [(_round_trip(compressor, x, round=t) - x).norm().item() for t in range(20)]

    # Assert
    assert errors[0] > 1.01 * best
    assert errors[-1] <= 1.01 * best


def test_powersgd_two_phase_mean_equals_compressing_the_mean() -> None:
    # Prepare: three peers with the same seed; a fourth compressor sees the mean vector directly
    peers = [PowerSGD(rank=4, seed=5) for _ in range(3)]
    xs = [_randn(10_000, seed=i) for i in range(3)]
    reference = PowerSGD(rank=4, seed=5)
    mean_x = torch.stack(xs).mean(dim=0)

    # Execute: two rounds of the two-phase all-reduce, each mean taken in plain torch
    for t in range(2):
        p_mean = torch.stack([peer.local_p(x, round=t) for peer, x in zip(peers, xs, strict=True)]).mean(dim=0)
        q_mean = torch.stack([peer.local_q(x, p_mean) for peer, x in zip(peers, xs, strict=True)]).mean(dim=0)
        results = [peer.finish(p_mean, q_mean, numel=10_000) for peer in peers]
        expected = _round_trip(reference, mean_x, round=t)

        # Assert: exact in the shared basis, and every peer keeps the same Q
        for result in results:
            assert_close(result, expected, rtol=1e-4, atol=1e-5)
        for peer in peers:
            assert peer.warm_q is not None and reference.warm_q is not None
            assert_close(peer.warm_q, reference.warm_q, rtol=1e-4, atol=1e-5)


# Per-tensor layout: a model's update as its parameters, in the order they are flattened.
SHAPES = [(48, 20), (20,), (6, 4, 5), (3, 3), (0,), (40, 48)]


def _per_tensor_reference(
    xs: list[torch.Tensor], shapes: list[tuple[int, ...]], rank: int, q_draw: torch.Generator
) -> torch.Tensor:
    """Plain-torch two-phase PowerSGD of the mean of xs, tensor by tensor: matrices of (shape[0], rest) that rank r
    shrinks get P̂ P̂ᵀ M̄ with P̂ from the mean of M_i Q (Q drawn in layout order), the rest their exact mean."""
    out, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        pieces = [x[offset : offset + size] for x in xs]
        offset += size
        rows = shape[0] if len(shape) >= 2 else size
        cols = size // rows if rows else 0
        r = min(rank, rows, cols)
        if len(shape) < 2 or r * (rows + cols) >= size:
            out.append(torch.stack(pieces).mean(0))
            continue
        q = torch.randn(cols, r, generator=q_draw)
        ms = [piece.view(rows, cols) for piece in pieces]
        p_hat = torch.linalg.qr(torch.stack([m @ q for m in ms]).mean(0)).Q
        out.append((p_hat @ torch.stack([m.T @ p_hat for m in ms]).mean(0).T).reshape(-1))
    return torch.cat(out)


def test_powersgd_per_tensor_two_phase_mean_matches_plain_torch() -> None:
    # Prepare: three peers' updates laid out as SHAPES
    numel = sum(math.prod(s) for s in SHAPES)
    peers = [PowerSGD(rank=2, seed=3, warm_start=False, shapes=SHAPES) for _ in range(3)]
    xs = [_randn(numel, seed=10 + i) for i in range(3)]

    # Execute: one two-phase round, each mean in plain torch
    p_mean = torch.stack([peer.local_p(x, round=7) for peer, x in zip(peers, xs, strict=True)]).mean(0)
    q_mean = torch.stack([peer.local_q(x, p_mean) for peer, x in zip(peers, xs, strict=True)]).mean(0)
    result = peers[0].finish(p_mean, q_mean, numel=numel)

    # Assert: the per-tensor definition, and a payload of (rows + cols) r values per shrunk matrix plus the rest
    from p2pfed.compression.base import seeded_generator

    expected = _per_tensor_reference(xs, SHAPES, 2, seeded_generator(3, 7, "powersgd"))
    assert_close(result, expected, rtol=1e-4, atol=1e-5)
    assert p_mean.numel() + q_mean.numel() == 2 * (48 + 20) + 20 + 2 * (6 + 20) + 9 + 0 + 2 * (40 + 48)


def test_powersgd_per_tensor_restores_low_rank_matrices_and_exact_vectors() -> None:
    # Prepare: every shrunk matrix of rank 2, every other tensor arbitrary
    compressor = PowerSGD(rank=2, shapes=SHAPES)
    parts = []
    for i, shape in enumerate(SHAPES):
        size = math.prod(shape)
        if len(shape) >= 2 and 2 * (shape[0] + size // shape[0]) < size:
            parts.append((_randn(shape[0], 2, seed=i) @ _randn(size // shape[0], 2, seed=50 + i).T).reshape(-1))
        else:
            parts.append(_randn(size, seed=i))
    x = torch.cat(parts)

    # Execute
    out = _round_trip(compressor, x)

    # Assert
    assert _relative_error(out, x) <= LOW_RANK_TOL
    assert compressor.compress(x, round=1).nbytes == 4 * (2 * (48 + 20) + 20 + 2 * (6 + 20) + 9 + 2 * (40 + 48)) + 3 * H


def test_powersgd_member_with_another_q_still_gets_the_projection_of_the_mean_and_then_the_groups_q() -> None:
    # Prepare: three warm-started peers after a round together; the third then missed a round (another Q)
    numel = sum(math.prod(s) for s in SHAPES)
    peers = [PowerSGD(rank=2, seed=3, shapes=SHAPES) for _ in range(3)]
    xs = [_randn(numel, seed=20 + i) for i in range(3)]
    for peer in peers:
        peer.warm_q = _randn(peer.sizes(numel)[1], seed=30)
    assert peers[2].warm_q is not None
    peers[2].warm_q = peers[2].warm_q + _randn(peers[2].warm_q.numel(), seed=31)

    # Execute: one two-phase round
    p_mean = torch.stack([peer.local_p(x, round=1) for peer, x in zip(peers, xs, strict=True)]).mean(0)
    q_mean = torch.stack([peer.local_q(x, p_mean) for peer, x in zip(peers, xs, strict=True)]).mean(0)
    results = [peer.finish(p_mean, q_mean, numel=numel) for peer in peers]

    # Assert: each matrix's result is P̂ P̂ᵀ of the mean matrix, P̂ from the mean P, and every peer keeps one Q
    mean_x = torch.stack(xs).mean(0)
    for seg in peers[0].layout(numel):
        part = mean_x[seg.offset : seg.offset + seg.numel]
        if seg.r:
            p_hat = torch.linalg.qr(p_mean[seg.p : seg.p + seg.rows * seg.r].view(seg.rows, seg.r)).Q
            part = (p_hat @ p_hat.T @ part.view(seg.rows, seg.cols)).reshape(-1)
        for result in results:
            assert_close(result[seg.offset : seg.offset + seg.numel], part, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(peer.warm_q, peers[0].warm_q) for peer in peers if peer.warm_q is not None)


def test_powersgd_shapes_must_add_up_to_the_vector() -> None:
    with pytest.raises(ValueError, match="powersgd shapes hold 12 elements, the vector has 13"):
        PowerSGD(shapes=[(3, 4)]).compress(_randn(13), round=0)


# --- wire sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", SIZES)
def test_payload_sizes_follow_their_formulas(numel: int) -> None:
    # Prepare: the documented wire formats; H per header int
    x = _randn(numel)
    k = _kept(0.01, numel)
    rows, cols, r = PowerSGD(rank=4).shape(numel)
    expected = {
        "none": 4 * numel + H,  # fp32 values, header (k,)
        "fp16": 2 * numel,  # half of fp32, no header
        "uint8": numel + 8 * math.ceil(numel / 1024) + H,  # one byte per value, fp32 (min, scale) per chunk
        "randomk": 4 * k + H,  # fp32 values only: the indices come from the shared seed
        "topk": k * (4 + 4) + H,  # int32 index + fp32 value
        "topk-fp16": k * (4 + 2) + H,  # int32 index + fp16 value
        "powersgd": 4 * r * (rows + cols) + 3 * H,  # P (rows, r) and Q (cols, r) in fp32, header (|P|, |Q|, rank)
    }

    # Execute
    sizes = {name: make_compressor(name).compress(x, round=0).nbytes for name in COMPRESSORS}
    sizes["topk-fp16"] = TopK(value_dtype="fp16").compress(x, round=0).nbytes

    # Assert
    assert sizes == expected


# --- averaging in the compressed domain -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compressor",
    [Fp32(), RandomK(ratio=0.1, seed=3), ErrorFeedback(RandomK(ratio=0.1, seed=3))],
    ids=["fp32", "randomk", "randomk-error-feedback"],
)
def test_linear_compressors_average_in_the_compressed_domain(compressor: Compressor) -> None:
    # Prepare: three peers' vectors, compressed in the same round
    xs = [_randn(1025, seed=i) for i in range(3)]
    payloads = [compressor.compress(x, round=4) for x in xs]
    inner = compressor.inner if isinstance(compressor, ErrorFeedback) else compressor
    assert compressor.linear and isinstance(inner, Fp32 | RandomK)

    # Execute
    after = torch.stack([compressor.decompress(p, numel=1025, round=4) for p in payloads]).mean(dim=0)
    values = torch.stack([inner.values(p) for p in payloads]).mean(dim=0)  # (peers, k) -> (k,)
    before = compressor.decompress(Payload(values.numpy().tobytes(), (values.numel(),)), numel=1025, round=4)

    # Assert
    assert_close(before, after)
    assert_close(compressor.decompress(inner.average(payloads), numel=1025, round=4), after)


def test_only_shared_basis_compressors_are_linear() -> None:
    linear = {name for name, cls in COMPRESSORS.items() if cls.linear}
    assert linear == {"none", "randomk"}


# --- error feedback ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("fp16", {}), ("uint8", {"seed": 2}), ("randomk", {"ratio": 0.1}), ("topk", {"ratio": 0.1}), ("powersgd", {})],
)
def test_error_feedback_residual_after_one_round_is_what_compression_dropped(name: str, options: dict) -> None:
    # Prepare
    x = _randn(1025)
    reference = make_compressor(name, **options)
    feedback = ErrorFeedback(make_compressor(name, **options))

    # Execute
    payload = feedback.compress(x, round=0)

    # Assert
    assert payload == reference.compress(x, round=0)
    assert feedback.residual is not None
    assert torch.equal(feedback.residual, x - _round_trip(make_compressor(name, **options), x))


def test_error_feedback_with_topk_keeps_the_residual_bounded_while_without_it_the_gap_grows_linearly() -> None:
    # Prepare: the same vector every round
    rounds, ratio = 200, 0.05
    x = _randn(1000)
    k = _kept(ratio, x.numel())
    # Top-k contracts: ||v - C(v)||² <= (1 - k / n) ||v||², so e' = (x + e) - C(x + e) has
    # ||e'|| <= gamma (||x|| + ||e||), gamma = sqrt(1 - k / n), and by induction ||e|| <= gamma / (1 - gamma) ||x||.
    gamma = math.sqrt(1 - k / x.numel())
    bound = gamma / (1 - gamma) * x.norm().item()
    feedback, plain = ErrorFeedback(TopK(ratio=ratio)), TopK(ratio=ratio)
    # float64 sums, so that the only rounding left to allow for is error feedback's own fp32 residual updates
    sum_in, sum_ef, sum_plain = (torch.zeros(1000, dtype=torch.float64) for _ in range(3))

    # Execute / Assert, round by round
    for t in range(rounds):
        sum_in += x
        sum_ef += _round_trip(feedback, x, round=t)
        sum_plain += _round_trip(plain, x, round=t)
        assert feedback.residual is not None
        assert feedback.residual.norm().item() <= bound * (1 + 1e-5)
        # What error feedback has not yet sent is exactly its residual, up to one fp32 rounding of x + e per round.
        assert_close(sum_in - sum_ef, feedback.residual.double(), rtol=0.0, atol=rounds * EPS * bound / gamma)

    # Assert: without feedback the same coordinates are dropped every round, so the gap is rounds * ||x - C(x)||
    gap_plain = (sum_in - sum_plain).norm().item()
    assert_close(gap_plain, rounds * (x - _round_trip(plain, x)).norm().item(), rtol=1e-4, atol=0.0)
    assert gap_plain > 3 * bound
    assert (sum_in - sum_ef).norm().item() <= bound * (1 + 1e-4)


def test_error_feedback_with_randomk_holds_each_coordinate_since_it_was_last_sent() -> None:
    # Prepare
    rounds, ratio = 400, 0.2
    x = _randn(500)
    sampler = RandomK(ratio=ratio, seed=9)
    feedback, plain = ErrorFeedback(RandomK(ratio=ratio, seed=9)), RandomK(ratio=ratio, seed=9)
    last_sent = torch.full((500,), -1.0)  # round in which each coordinate was last kept
    sum_ef, sum_plain = torch.zeros(500), torch.zeros(500)

    # Execute / Assert, round by round: the residual of coordinate i is x_i times the rounds since it was last sent
    for t in range(rounds):
        sum_ef += _round_trip(feedback, x, round=t)
        sum_plain += _round_trip(plain, x, round=t)
        last_sent[sampler.indices(500, round=t)] = t
        assert feedback.residual is not None
        # The residual is built by up to `rounds` fp32 additions of x_i, each off by at most eps relative.
        assert_close(feedback.residual, x * (t - last_sent), rtol=rounds * EPS, atol=0.0)

    # Assert: the gap with feedback is bounded by the longest wait; without it, the gap grows like (1 - ratio) * t
    wait = (rounds - 1 - last_sent).max().item()
    gap_ef = (rounds * x - sum_ef).norm().item()
    gap_plain = (rounds * x - sum_plain).norm().item()
    assert gap_ef <= wait * x.norm().item() * (1 + 1e-4)
    assert gap_plain >= 0.5 * (1 - ratio) * rounds * x.norm().item()
    assert gap_ef < gap_plain / 10


def test_error_feedback_rejects_a_vector_of_another_size() -> None:
    feedback = ErrorFeedback(TopK())
    feedback.compress(_randn(100), round=0)
    with pytest.raises(ValueError, match="residual of 100 elements, got 99"):
        feedback.compress(_randn(99), round=1)


# --- registry and validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_every_registered_compressor_builds_with_defaults(name: str) -> None:
    compressor = make_compressor(name)
    assert isinstance(compressor, COMPRESSORS[name])
    assert _round_trip(compressor, _randn(10)).shape == (10,)


def test_unknown_compressor_names_itself_and_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        make_compressor("zstd")
    message = str(info.value)
    assert "\n" not in message
    assert "'zstd'" in message
    assert all(name in message for name in COMPRESSORS)


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("randomk", {"ratio": 0}, "ratio must be in (0, 1], got 0"),
        ("topk", {"ratio": 1.5}, "ratio must be in (0, 1], got 1.5"),
        ("randomk", {"ratio": "0.1"}, "ratio must be in (0, 1], got '0.1'"),
        ("randomk", {"scale": 1}, "scale must be true or false, got 1"),
        ("topk", {"value_dtype": "bf16"}, "value_dtype must be one of 'fp32', 'fp16', got 'bf16'"),
        ("uint8", {"chunk": 0}, "chunk must be an integer >= 1, got 0"),
        ("uint8", {"rounding": "up"}, "rounding must be one of 'stochastic', 'nearest', got 'up'"),
        ("powersgd", {"rank": 0}, "rank must be an integer >= 1, got 0"),
        ("powersgd", {"seed": -1}, "seed must be an integer >= 0, got -1"),
        ("randomk", {"ratios": 0.1}, "has no option 'ratios'; valid options: ratio, seed, scale"),
        ("fp16", {"ratio": 0.1}, "has no option 'ratio'; valid options: (none)"),
    ],
)
def test_a_bad_option_is_named_in_one_line(name: str, options: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        make_compressor(name, **options)
    message = str(info.value)
    assert "\n" not in message
    assert f"compressor '{name}'" in message
    assert fragment in message


def test_decompress_rejects_a_payload_that_does_not_fit() -> None:
    # Prepare: a peer configured with another ratio, and a truncated payload
    x = _randn(1000)
    other = TopK(ratio=0.02).compress(x, round=0)
    good = TopK(ratio=0.01).compress(x, round=0)
    truncated = Payload(good.data[:-1], good.header)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"header \(20,\) does not match this compressor's \(10,\)"):
        TopK(ratio=0.01).decompress(other, numel=1000, round=0)
    with pytest.raises(ValueError, match="payload has 79 bytes, expected 80"):
        TopK(ratio=0.01).decompress(truncated, numel=1000, round=0)
    with pytest.raises(ValueError, match="round must be an integer >= 0, got -1"):
        RandomK().compress(x, round=-1)


def test_randomk_draws_one_coordinate_per_block_and_scales_by_the_block_size() -> None:
    # Prepare: a size that k does not divide, so blocks differ in size by one
    numel = 1025
    compressor = RandomK(ratio=0.1, seed=5, scale=True)
    k = _kept(0.1, numel)
    starts = [j * numel // k for j in range(k + 1)]

    # Execute
    chosen = compressor.indices(numel, round=2)
    x = _randn(numel)
    values = compressor.encode(x, round=2)

    # Assert: coordinate j lies in block j, and its value is scaled by that block's size (so E[x̂] = x)
    assert chosen.numel() == k
    for j, i in enumerate(chosen.tolist()):
        assert starts[j] <= i < starts[j + 1]
    sizes = torch.tensor([starts[j + 1] - starts[j] for j in range(k)], dtype=torch.float32)
    assert_close(values, x[chosen] * sizes)
