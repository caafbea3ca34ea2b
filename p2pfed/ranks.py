"""A peer that spans several GPUs or processes: `torchrun --nproc-per-node N -m p2pfed peer ...`.

    ranks = RankGroup.from_env(device)              # None outside torchrun (WORLD_SIZE unset or 1)
    trainer.ranks = ranks                            # rank 0: its Trainer leads the others
    run_follower(cfg, profile, ranks)               # ranks 1..N-1: mirror the leader until it stops

torch.distributed (NCCL on GPUs, gloo on CPU) works inside the peer; only rank 0 joins the swarm. Every rank holds
the same model and optimizer. Each rank computes its share of the peer's batch on its own slice of the peer's data,
and the ranks average their gradients (weighted by samples) after every backward, so they stay identical through
DiLoCo's inner steps too. Every other change of the model (applying the swarm's average, an outer step, a downloaded
or restored state) happens on rank 0 first: rank 0 sends the operation and its tensors, and the followers apply the
same operation, so all ranks end each step bit for bit equal. The swarm sees one peer with the throughput of all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from p2pfed.config import Config, Profile

__all__ = ["RankGroup", "run_follower", "share_of"]

logger = logging.getLogger(__name__)

STOP = "stop"


def share_of(total: int, rank: int, world: int) -> int:
    """Rank `rank`'s part of `total` samples: equal parts, the first ranks taking one more when it does not divide."""
    return total // world + int(rank < total % world)


@dataclass
class RankGroup:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_env(cls, device: str) -> RankGroup | None:
        """The torchrun job this process belongs to (WORLD_SIZE > 1), its process group initialised; else None."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device in ("cuda", "auto") and torch.cuda.is_available():
            torch.cuda.set_device(local)
            where, backend = torch.device("cuda", local), "nccl"
        else:
            where, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=rank, world=world, device=where)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # --- inside a step: every rank takes part -------------------------------------------------------------------

    def average_grads(self, params: Sequence[torch.Tensor], samples: int, loss: float) -> tuple[int, float]:
        """Replace each p.grad (the mean over this rank's `samples`) by the mean over every rank's samples; returns
        (samples, mean loss) of the whole peer."""
        weight = torch.tensor([float(samples), loss * samples], dtype=torch.float64, device=self.device)
        dist.all_reduce(weight)
        total = float(weight[0])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]) * (samples / total)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        return int(total), float(weight[1]) / total

    # --- between steps: rank 0 leads ------------------------------------------------------------------------------

    def lead(self, op: str, args: Sequence[Any] = (), tensors: Sequence[torch.Tensor | None] = ()) -> None:
        """Rank 0: tell the followers to run Trainer operation `op` with these arguments and tensors."""
        specs = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
        dist.broadcast_object_list([op, list(args), specs], src=0)
        for t in tensors:
            if t is not None:
                dist.broadcast(t.detach().to(self.device).contiguous(), src=0)

    def follow(self) -> tuple[str, list[Any], list[torch.Tensor | None]]:
        """Ranks 1..N-1: the next operation rank 0 leads, with its tensors (on this rank's device)."""
        header: list[Any] = [None, None, None]
        dist.broadcast_object_list(header, src=0)
        op, args, specs = header
        tensors: list[torch.Tensor | None] = []
        for spec in specs:
            if spec is None:
                tensors.append(None)
                continue
            t = torch.empty(spec[0], dtype=spec[1], device=self.device)
            dist.broadcast(t, src=0)
            tensors.append(t.cpu())
        return op, args, tensors

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_follower(cfg: Config, profile: Profile, ranks: RankGroup, *, save_params: str | None = None) -> None:
    """Ranks 1..N-1 of a torchrun peer: build the same model on the same shard as rank 0 (it says which), take this
    rank's slice of it, and apply every operation rank 0 leads until it says stop (if rank 0 dies instead, torchrun
    ends the whole job)."""
    from p2pfed.actors.trainer import Trainer
    from p2pfed.data import load_corpus

    corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
    op, args, _ = ranks.follow()
    if op == STOP:  # rank 0 stopped before training (a bad swarm address, Ctrl+C)
        ranks.close()
        return
    index, count = args
    d = cfg.data
    rows = corpus.partition_rows(index=index, count=count, partitioner=d.partitioner, alpha=d.dirichlet_alpha)
    trainer = Trainer(cfg, profile, corpus, corpus.train[rows][ranks.rank :: ranks.world], shard_index=index)
    trainer.ranks = ranks
    trainer._build()
    logger.info("rank %d of %d follows rank 0", ranks.rank, ranks.world)
    while True:
        op, args, tensors = ranks.follow()
        if op == STOP:
            break
        trainer.follow(op, args, tensors)
    if save_params:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainer._snapshot().items()}, save_params)
    ranks.close()
