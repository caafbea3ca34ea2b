"""`powersgd`: a rank-r approximation of the update by one power-iteration step per round, per weight matrix when the
update's layout is known (Vogels et al., 2019).

    compressor = PowerSGD(rank=4, seed=run_seed, shapes=[p.shape for p in model.parameters()])
    payload = compressor.compress(x, round=r)      # P and Q of each matrix, and the vectors as they are, in fp32

Layout. With `shapes` (the model's parameters in the order they are flattened), each tensor of two or more dims is a
matrix M of (shape[0], the rest) and each 1-D tensor (norms, biases) goes as it is, as does a matrix so small that
rank r saves nothing (r (rows + cols) >= rows cols). Without shapes, the whole vector is zero-padded to
rows * cols (cols = ceil(sqrt(numel)), rows = ceil(numel / cols)) and viewed as one M; an update's structure is
then lost, so low rank costs far more accuracy: keep that for vectors that are not a model's (benchmarks).

Per matrix, with Q from the last round (the first from `seed`, the same on every peer): P = M Q, P̂ = orthonormal
basis of P, Q' = Mᵀ P̂, and x̂ = P̂ Q'ᵀ = P̂ P̂ᵀ M; Q' is kept as the next round's Q. Every matrix's Q of a round comes
from one generator, in layout order.

Error bound, per matrix: x̂ projects M's columns onto span(P̂), so best_r <= ||M - x̂||_F <= ||M||_F, where best_r
is the truncated-SVD error (Eckart-Young). Warm starting makes the rounds a subspace iteration: on a slowly changing
M the error approaches best_r at a rate (sigma_{r+1} / sigma_r) per round, and when M has rank <= r it is exact (to
fp32 rounding) after one round. The vectors sent as they are are exact.

Honest limits. compress/decompress is the single-peer pair: if each peer compresses its own M_i and the group
averages the decompressed x̂_i, the result is the mean of per-peer rank-r approximations, and each peer's Q drifts
apart. True PowerSGD all-reduces in two phases, P_i = M_i Q first (with the vectors), then Q_i = M_iᵀ P̂ with P̂ from
the mean of the P_i; both phases are linear in M_i given the shared Q, so the group gets exactly the rank-r step of
the mean M and every peer keeps the same Q. `local_p`, `local_q` and `finish` are those phases for a two-phase
all-reduce, on flat vectors. A peer whose Q differs (it joined late or missed a round) puts its P_i in another
basis: the group still gets P̂ P̂ᵀ M̄ exactly for the P̂ it agrees on, only in a worse subspace that round, and
every peer that finishes the round keeps the group's mean Q.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from p2pfed.compression.base import (
    Compressor,
    Payload,
    check_flag,
    check_int,
    check_round,
    flat32,
    pack,
    seeded_generator,
    unpack,
)

__all__ = ["PowerSGD"]


def orthonormal(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of p's columns, (rows, r); Householder QR keeps it orthonormal when p is rank-deficient."""
    return torch.linalg.qr(p, mode="reduced").Q


@dataclass(frozen=True, slots=True)
class Segment:
    """One tensor of the layout: elements [offset, offset + numel) of the flat vector, as a (rows, cols) matrix of
    rank r (rows * cols may exceed numel: zero padding), or sent as it is when r == 0. p and q: where its P (or the
    values themselves) and its Q start in the flat P and Q vectors."""

    offset: int
    numel: int
    rows: int
    cols: int
    r: int
    p: int
    q: int

    @property
    def p_size(self) -> int:
        return self.rows * self.r if self.r else self.numel

    @property
    def q_size(self) -> int:
        return self.cols * self.r


@dataclass(kw_only=True)
class PowerSGD(Compressor):
    """Options: rank (r, the number of power-iteration vectors), seed (shared by the group: the first Q), warm_start
    (Q from the round before; off, every round draws a fresh Q from (seed, round), so a peer that missed a round
    still projects onto the same basis as the rest of its group), shapes (the tensors the flat vector is made of, in
    order: one low-rank matrix per tensor of two or more dims; None, one matrix of the whole vector)."""

    rank: int = 4
    seed: int = 0
    warm_start: bool = True
    shapes: Sequence[Sequence[int]] | None = None
    warm_q: torch.Tensor | None = field(default=None, init=False, repr=False)  # (q_size,), last round's Qs

    def __post_init__(self) -> None:
        check_int("rank", self.rank, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_flag("warm_start", self.warm_start)
        if self.shapes is not None:
            self.shapes = tuple(tuple(int(d) for d in shape) for shape in self.shapes)
            if any(d < 0 for shape in self.shapes for d in shape):
                raise ValueError(f"shapes must have no negative dims, got {self.shapes}")

    def shape(self, numel: int) -> tuple[int, int, int]:
        """(rows, cols, r) for a whole vector of numel elements as one matrix: near-square, r capped by its size."""
        cols = math.isqrt(numel - 1) + 1  # ceil(sqrt(numel)) for numel >= 1
        rows = math.ceil(numel / cols)
        return rows, cols, min(self.rank, rows, cols)

    def layout(self, numel: int) -> list[Segment]:
        """The segments of a vector of numel elements; ValueError when `shapes` do not add up to numel."""
        if self.shapes is None:
            rows, cols, r = self.shape(numel)
            return [Segment(0, numel, rows, cols, r, 0, 0)]
        total = sum(math.prod(shape) for shape in self.shapes)
        if total != numel:
            raise ValueError(f"powersgd shapes hold {total} elements, the vector has {numel}")
        segments, offset, p, q = [], 0, 0, 0
        for shape in self.shapes:
            size = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else size
            cols = size // rows if rows else 0
            r = min(self.rank, rows, cols) if len(shape) >= 2 else 0
            if r * (rows + cols) >= size:  # low rank would send as much as the tensor: send it as it is
                r = 0
            segment = Segment(offset, size, rows, cols, r, p, q)
            segments.append(segment)
            offset, p, q = offset + size, p + segment.p_size, q + segment.q_size
        return segments

    def sizes(self, numel: int) -> tuple[int, int]:
        """How many values the flat P (with the vectors sent as they are) and Q of a vector of numel elements hold."""
        last = self.layout(numel)[-1]
        return last.p + last.p_size, last.q + last.q_size

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        p_all = self.local_p(x, round=round)  # the two phases on this peer's vector alone
        q = self.local_q(x, p_all)
        self.warm_q = q
        return Payload(pack(p_all, q), header=(p_all.numel(), q.numel(), self.rank))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        p_size, q_size = self.sizes(numel)
        p_all, q = unpack(payload, (p_size, q_size, self.rank), (np.float32, p_size), (np.float32, q_size))
        return self._assemble(p_all, q, numel)

    # The two phases of a group all-reduce, on flat vectors; every peer calls them with the group's means.

    def local_p(self, x: torch.Tensor, *, round: int) -> torch.Tensor:
        """Phase one: this peer's flat P, each matrix's M Q (rows, r) and each other tensor as it is, to average."""
        check_round(round)
        flat = flat32(x)
        segments = self.layout(flat.numel())
        qs = self._qs(segments, round)
        parts = [
            (self._matrix(flat, seg) @ self._q(qs, seg)).reshape(-1)
            if seg.r
            else flat[seg.offset : seg.offset + seg.numel]
            for seg in segments
        ]
        return torch.cat(parts)

    def local_q(self, x: torch.Tensor, p_mean: torch.Tensor) -> torch.Tensor:
        """Phase two: this peer's flat Q, each matrix's Mᵀ P̂ (cols, r) with P̂ from the group's mean P, to average."""
        flat, p_mean = flat32(x), p_mean.reshape(-1)
        parts = [
            (self._matrix(flat, seg).T @ orthonormal(self._p(p_mean, seg))).reshape(-1)
            for seg in self.layout(flat.numel())
            if seg.r
        ]
        return torch.cat(parts) if parts else torch.zeros(0)

    def finish(self, p_mean: torch.Tensor, q_mean: torch.Tensor, *, numel: int) -> torch.Tensor:
        """The group's (numel,) rank-r average from the two means; keeps q_mean as the next round's Q."""
        self.warm_q = q_mean.reshape(-1).clone()
        return self._assemble(p_mean.reshape(-1), q_mean.reshape(-1), numel)

    def _assemble(self, p_all: torch.Tensor, q: torch.Tensor, numel: int) -> torch.Tensor:
        """The (numel,) vector of P̂ Qᵀ per matrix (P̂ the orthonormal basis of its P) and the tensors sent as is."""
        out = torch.empty(numel, dtype=torch.float32)
        for seg in self.layout(numel):
            dest = out[seg.offset : seg.offset + seg.numel]
            if not seg.r:
                dest.copy_(p_all[seg.p : seg.p + seg.numel])
                continue
            p_hat = orthonormal(self._p(p_all, seg))
            dest.copy_((p_hat @ self._q(q, seg).T).reshape(-1)[: seg.numel])  # (rows, cols), cut to the tensor
        return out

    @staticmethod
    def _p(p_all: torch.Tensor, seg: Segment) -> torch.Tensor:
        return p_all[seg.p : seg.p + seg.p_size].view(seg.rows, seg.r)

    @staticmethod
    def _q(q_all: torch.Tensor, seg: Segment) -> torch.Tensor:
        return q_all[seg.q : seg.q + seg.q_size].view(seg.cols, seg.r)

    @staticmethod
    def _matrix(flat: torch.Tensor, seg: Segment) -> torch.Tensor:
        piece = flat[seg.offset : seg.offset + seg.numel]
        if seg.rows * seg.cols == seg.numel:  # a tensor of the layout: a view, no copy
            return piece.view(seg.rows, seg.cols)
        return torch.nn.functional.pad(piece, (0, seg.rows * seg.cols - seg.numel)).view(seg.rows, seg.cols)

    def _qs(self, segments: list[Segment], round: int) -> torch.Tensor:
        """(q_size,) this round's Q of every matrix: last round's where warm starting, else drawn from (seed, round)."""
        size = segments[-1].q + segments[-1].q_size
        if not self.warm_start:
            return self._drawn(segments, round)
        q = self.warm_q
        if q is None or q.numel() != size:  # a new layout starts over from the seed
            return self._drawn(segments, 0)
        # An all-zero update leaves a matrix's Q = 0 and P = 0 for good: that matrix starts over from the seed.
        zero = [seg for seg in segments if seg.r and not bool(self._q(q, seg).any())]
        if zero:
            q, seeded = q.clone(), self._drawn(segments, 0)
            for seg in zero:
                self._q(q, seg).copy_(self._q(seeded, seg))
        return q

    def _drawn(self, segments: list[Segment], round: int) -> torch.Tensor:
        generator = seeded_generator(self.seed, round, "powersgd")
        parts = [torch.randn(seg.cols, seg.r, generator=generator).reshape(-1) for seg in segments if seg.r]
        return torch.cat(parts) if parts else torch.zeros(0)
