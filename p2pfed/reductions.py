"""How one round's update crosses the group, per compressor: the steps around the butterfly all-reduce.

    reduction = make_reduction(cfg.compression, seed=cfg.run.seed, peer_seed=peer_seed)
    mean = await reduction.run(x, allreduce, round=r)      # None when the round failed; x is never written

`allreduce(vector, codec, phase)` is the group's weighted mean of `vector`, with `codec` on both legs, or None.

| name            | reduction | what crosses the wire                                                          |
|-----------------|-----------|--------------------------------------------------------------------------------|
| none/fp16/uint8 | Dense     | the update itself, compressed on the way to each reducer and on the way back   |
| randomk         | Coords    | the k shared-seed coordinates (linear: the group averages them exactly)        |
| topk            | TopK      | each peer's top-k as sparse parts; the reducers' sums as sparse replies         |
| powersgd        | LowRank   | per weight matrix, P = M Q, then Q = Mᵀ P̂: (rows + cols) * rank values each     |

Error feedback (on by default for the last three) keeps what this peer's compression dropped and adds it to the next
round's update. The residual commits only when the round does: a failed round loses nothing.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence

import torch

from p2pfed.compression import Fp16, Fp32, PowerSGD, RandomK, TopK, Uint8
from p2pfed.compression.base import Compressor
from p2pfed.compression.sparse import Sparse
from p2pfed.config import CompressionConfig

__all__ = ["AllReduce", "Coords", "Dense", "LowRank", "Reduction", "TopKReduction", "make_reduction", "round_seed"]

AllReduce = Callable[[torch.Tensor, Compressor, str], Awaitable[torch.Tensor | None]]


def round_seed(group_id: bytes) -> int:
    """The round number every member of a group derives alike from its id, for shared-seed compressors."""
    return int.from_bytes(hashlib.blake2b(group_id, digest_size=4).digest(), "little")


class Reduction(ABC):
    """Turns this peer's flat fp32 update into the group's mean, through one or more all-reduces."""

    @abstractmethod
    async def run(self, x: torch.Tensor, allreduce: AllReduce, *, round: int) -> torch.Tensor | None:
        """The group's (numel,) mean update, or None when any all-reduce of the round failed."""


class _Feedback:
    """An error-feedback residual that commits only when its round does."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.residual: torch.Tensor | None = None  # (numel,) fp32

    def corrected(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.residual is None or self.residual.numel() != x.numel():
            return x
        return x + self.residual

    def commit(self, corrected: torch.Tensor, sent: torch.Tensor) -> None:
        if self.enabled:
            self.residual = corrected - sent


class Dense(Reduction):
    """The update as it is, through a quantizing (or exact) codec on both legs."""

    def __init__(self, codec: Compressor) -> None:
        self.codec = codec

    async def run(self, x: torch.Tensor, allreduce: AllReduce, *, round: int) -> torch.Tensor | None:
        return await allreduce(x, self.codec, "dense")


class Coords(Reduction):
    """Shared-seed random-k: every member keeps the same k coordinates, so the group averages just those."""

    def __init__(self, compressor: RandomK, *, error_feedback: bool) -> None:
        self.compressor, self.feedback = compressor, _Feedback(error_feedback)

    async def run(self, x: torch.Tensor, allreduce: AllReduce, *, round: int) -> torch.Tensor | None:
        corrected = self.feedback.corrected(x)
        coords = self.compressor.encode(corrected, round=round)  # (k,)
        mean = await allreduce(coords, Fp32(), "coords")
        if mean is None:
            return None
        if self.feedback.enabled:  # a pass over the whole vector: only error feedback needs what this peer sent
            self.feedback.commit(corrected, self.compressor.decode(coords, numel=x.numel(), round=round))
        return self.compressor.decode(mean, numel=x.numel(), round=round)


class TopKReduction(Reduction):
    """Each member's own top-k (with error feedback), averaged as sparse vectors; exact on the wire."""

    def __init__(self, compressor: TopK, *, error_feedback: bool) -> None:
        self.compressor, self.feedback = compressor, _Feedback(error_feedback)

    async def run(self, x: torch.Tensor, allreduce: AllReduce, *, round: int) -> torch.Tensor | None:
        corrected = self.feedback.corrected(x)
        payload = self.compressor.compress(corrected, round=round)
        kept = self.compressor.decompress(payload, numel=x.numel(), round=round)  # (numel,), k nonzeros
        mean = await allreduce(kept, Sparse(), "topk")
        if mean is not None:
            self.feedback.commit(corrected, kept)
        return mean


class LowRank(Reduction):
    """PowerSGD in two all-reduces: the mean P of M_i Q, then the mean Q of M_iᵀ P̂; the group gets P̂ Q̄ᵀ."""

    def __init__(self, compressor: PowerSGD, *, error_feedback: bool) -> None:
        self.compressor, self.feedback = compressor, _Feedback(error_feedback)

    async def run(self, x: torch.Tensor, allreduce: AllReduce, *, round: int) -> torch.Tensor | None:
        corrected = self.feedback.corrected(x)
        p_mean = await allreduce(self.compressor.local_p(corrected, round=round), Fp32(), "p")
        if p_mean is None:
            return None
        q_local = self.compressor.local_q(corrected, p_mean)  # (q_size,)
        q_mean = await allreduce(q_local, Fp32(), "q")
        if q_mean is None:
            return None
        if self.feedback.enabled:
            mine = self.compressor.finish(p_mean, q_local, numel=x.numel())  # this peer's own rank-r part
            self.feedback.commit(corrected, mine)
        return self.compressor.finish(p_mean, q_mean, numel=x.numel())


def make_reduction(
    cfg: CompressionConfig, *, seed: int, peer_seed: int, shapes: Sequence[Sequence[int]] | None = None
) -> Reduction:
    """The reduction for `compression.name`; `seed` is shared by the run, `peer_seed` is this peer's own, `shapes`
    the tensors the update is made of, in order (PowerSGD's matrices; None: one matrix of the whole vector)."""
    name = cfg.name
    if name == "none":
        return Dense(Fp32())
    if name == "fp16":
        return Dense(Fp16())
    if name == "uint8":
        return Dense(Uint8(seed=peer_seed))  # independent rounding noise per peer shrinks in the mean
    if name == "randomk":
        return Coords(RandomK(ratio=cfg.ratio, seed=seed), error_feedback=cfg.error_feedback)
    if name == "topk":
        return TopKReduction(TopK(ratio=cfg.ratio), error_feedback=cfg.error_feedback)
    if name == "powersgd":
        # Q warm-started from the group's last mean Q (PowerSGD's subspace iteration). A member whose Q differs (it
        # missed a round, or just joined) still gets the exact projection of the group's mean onto the P̂ the group
        # agreed on, only onto a worse subspace that round; from then on its Q is the group's.
        compressor = PowerSGD(rank=cfg.rank, seed=seed, warm_start=True, shapes=shapes)
        return LowRank(compressor, error_feedback=cfg.error_feedback)
    raise ValueError(f"unknown compression {name!r}")
