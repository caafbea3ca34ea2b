"""`powersgd`: a rank-r approximation of the update, seen as a near-square matrix, by one power-iteration step per
round with Q warm-started from the round before (Vogels et al., 2019).

    compressor = PowerSGD(rank=4, seed=run_seed)
    payload = compressor.compress(x, round=r)      # P̂ (rows, r) and Q (cols, r) as fp32: 4 r (rows + cols) bytes

The vector is zero-padded to rows * cols (cols = ceil(sqrt(numel)), rows = ceil(numel / cols)) and viewed as M.
With Q from the last round (the first from `seed`, the same on every peer): P = M Q, P̂ = orthonormal basis of P,
Q' = Mᵀ P̂, and x̂ = P̂ Q'ᵀ = P̂ P̂ᵀ M, flattened and cut to numel; Q' is kept as the next round's Q.

Error bound: x̂ projects M's columns onto span(P̂), so best_r <= ||M - x̂||_F <= ||M||_F, where best_r is the
truncated-SVD error (Eckart-Young). Warm starting makes the rounds a subspace iteration: on a slowly changing M the
error approaches best_r at a rate (sigma_{r+1} / sigma_r) per round, and when M has rank <= r it is exact (to fp32
rounding) after one round.

Honest limits. compress/decompress is the single-peer pair: if each peer compresses its own M_i and the group
averages the decompressed x̂_i, the result is the mean of per-peer rank-r approximations, and each peer's Q drifts
apart. True PowerSGD all-reduces in two phases, P_i = M_i Q first, then Q_i = M_iᵀ P̂ with P̂ from the mean of the
P_i; both phases are linear in M_i given the shared Q, so the group gets exactly the rank-r step of the mean M and
every peer keeps the same Q. `local_p`, `local_q` and `finish` are those phases for a two-phase all-reduce; a peer
that joins late must copy `warm_q` from the group first, or its P_i will be in another basis.
"""

from __future__ import annotations

import math
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


@dataclass(kw_only=True)
class PowerSGD(Compressor):
    """Options: rank (r, the number of power-iteration vectors), seed (shared by the group: the first Q), warm_start
    (Q from the round before; off, every round draws a fresh Q from (seed, round), so a peer that missed a round
    still projects onto the same basis as the rest of its group)."""

    rank: int = 4
    seed: int = 0
    warm_start: bool = True
    warm_q: torch.Tensor | None = field(default=None, init=False, repr=False)  # (cols, r), last round's Q

    def __post_init__(self) -> None:
        check_int("rank", self.rank, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_flag("warm_start", self.warm_start)

    def shape(self, numel: int) -> tuple[int, int, int]:
        """(rows, cols, r) for a vector of numel elements: near-square, r capped by the matrix's own size."""
        cols = math.isqrt(numel - 1) + 1  # ceil(sqrt(numel)) for numel >= 1
        rows = math.ceil(numel / cols)
        return rows, cols, min(self.rank, rows, cols)

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        check_round(round)
        rows, cols, r = self.shape(x.numel())
        m = self._matrix(flat32(x))  # (rows, cols)
        p_hat = orthonormal(m @ self._q(cols, r, round))  # (rows, r)
        q = m.T @ p_hat  # (cols, r)
        self.warm_q = q
        return Payload(pack(p_hat, q), header=(rows, cols, r))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        rows, cols, r = self.shape(numel)
        p_hat, q = unpack(payload, (rows, cols, r), (np.float32, rows * r), (np.float32, cols * r))
        return (p_hat.view(rows, r) @ q.view(cols, r).T).reshape(-1)[:numel]  # (rows, cols) -> (numel,)

    # The two phases of a group all-reduce; every peer calls them with the group's means.

    def local_p(self, x: torch.Tensor, *, round: int) -> torch.Tensor:
        """Phase one: this peer's P = M Q, (rows, r), for the group to average."""
        check_round(round)
        m = self._matrix(flat32(x))  # (rows, cols)
        return m @ self._q(m.shape[1], self.shape(x.numel())[2], round)

    def local_q(self, x: torch.Tensor, p_mean: torch.Tensor) -> torch.Tensor:
        """Phase two: this peer's Q = Mᵀ P̂, (cols, r), with P̂ from the group's mean P, for the group to average."""
        return self._matrix(flat32(x)).T @ orthonormal(p_mean)

    def finish(self, p_mean: torch.Tensor, q_mean: torch.Tensor, *, numel: int) -> torch.Tensor:
        """The group's (numel,) rank-r average from the two means; keeps q_mean as the next round's Q."""
        self.warm_q = q_mean.clone()
        return (orthonormal(p_mean) @ q_mean.T).reshape(-1)[:numel]

    def _matrix(self, flat: torch.Tensor) -> torch.Tensor:
        rows, cols, _ = self.shape(flat.numel())
        return torch.nn.functional.pad(flat, (0, rows * cols - flat.numel())).view(rows, cols)

    def _q(self, cols: int, r: int, round: int) -> torch.Tensor:
        if not self.warm_start:
            return torch.randn(cols, r, generator=seeded_generator(self.seed, round, "powersgd"))
        q = self.warm_q
        # A new shape, or an all-zero update (which leaves Q = 0 and P = 0 for good), starts over from the seed.
        if q is None or q.shape != (cols, r) or not bool(q.any()):
            q = torch.randn(cols, r, generator=seeded_generator(self.seed, 0, "powersgd"))
        return q
