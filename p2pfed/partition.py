"""Partitioners: which training sequences each peer trains on, as a pure function of the data and the seed.

    part = make_partitioner(cfg.data)                      # iid, dirichlet or by_file
    rows = part.rows(sources, index=1, count=3, seed=0)    # (n,) int64 indices into corpus.train

`sources` is the (N,) source id of every training sequence (the file, or for the embedded corpus the stdlib module,
its first token came from). Every partitioner deals each sequence to exactly one of `count` partitions, so the
partitions are disjoint and together cover the training split, and the same (sources, count, seed) always give the
same partitions: peers never ship data, they each compute their own rows.

| name      | what a peer gets                                                                                 |
|-----------|--------------------------------------------------------------------------------------------------|
| iid       | every count-th sequence of the shuffled split (balanced to one sequence, same mix of sources)     |
| dirichlet | of each source, a share drawn from Dirichlet(alpha, ..., alpha): small alpha, few sources per peer |
| by_file   | whole sources, largest first to the partition holding the fewest sequences so far                 |

Dirichlet over sources is the usual non-IID benchmark split of federated learning (Hsu et al., 2019, over labels;
here a source plays the label's part): alpha = 100 is close to iid, alpha = 0.1 gives most peers a few sources.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.errors import ConfigError

__all__ = ["ByFile", "Dirichlet", "Iid", "Partitioner", "make_partitioner", "shard_stats"]


class Partitioner(ABC):
    name: str

    def rows(self, sources: torch.Tensor, *, index: int, count: int, seed: int) -> torch.Tensor:
        """The (n,) sorted indices of the sequences of partition `index` of `count`."""
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"data.partition_index must be in [0, {count}), got {index}")
        if len(sources) < count:
            raise ConfigError(f"the corpus has {len(sources)} training sequences, fewer than {count} partitions")
        owner = self.owners(sources, count=count, seed=seed)  # (N,) partition of each sequence
        rows = torch.nonzero(owner == index).flatten()
        if len(rows) == 0:
            raise ConfigError(
                f"data.partitioner {self.name} left partition {index} of {count} without training sequences "
                f"({int(sources.max()) + 1 if len(sources) else 0} sources): use fewer partitions or more data"
                + (", or a larger data.dirichlet_alpha" if self.name == "dirichlet" else "")
            )
        return rows

    @abstractmethod
    def owners(self, sources: torch.Tensor, *, count: int, seed: int) -> torch.Tensor:
        """(N,) int64: the partition each sequence belongs to."""


class Iid(Partitioner):
    name = "iid"

    def owners(self, sources: torch.Tensor, *, count: int, seed: int) -> torch.Tensor:
        return torch.arange(len(sources), dtype=torch.int64) % count  # the split is already shuffled by the seed


@dataclass(frozen=True)
class Dirichlet(Partitioner):
    alpha: float
    name = "dirichlet"

    def owners(self, sources: torch.Tensor, *, count: int, seed: int) -> torch.Tensor:
        owner = torch.empty(len(sources), dtype=torch.int64)
        for source in torch.unique(sources).tolist():
            rows = torch.nonzero(sources == source).flatten()  # in split order: already shuffled by the seed
            rng = np.random.default_rng([seed, int(source), _STREAM])
            shares = rng.dirichlet(np.full(count, self.alpha))  # (count,)
            # Cut the source's sequences into count runs by the cumulative shares (rounded to whole sequences).
            cuts = np.rint(np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            owner[rows] = torch.from_numpy(np.searchsorted(cuts, np.arange(len(rows)), side="right"))
        return owner


class ByFile(Partitioner):
    name = "by_file"

    def owners(self, sources: torch.Tensor, *, count: int, seed: int) -> torch.Tensor:
        ids, sizes = torch.unique(sources, return_counts=True)
        load = [0] * count
        owner_of: dict[int, int] = {}
        # Largest first, each to the lightest partition (lowest index on ties): balanced and deterministic.
        for source, size in sorted(zip(ids.tolist(), sizes.tolist(), strict=True), key=lambda p: (-p[1], p[0])):
            target = min(range(count), key=lambda i: (load[i], i))
            owner_of[source] = target
            load[target] += size
        lookup = torch.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=torch.int64)
        for source, target in owner_of.items():
            lookup[source] = target
        return lookup[sources]


_STREAM = int.from_bytes(hashlib.blake2b(b"p2pfed.dirichlet", digest_size=4).digest(), "little")


def make_partitioner(name: str, *, alpha: float = 0.5) -> Partitioner:
    if name == "iid":
        return Iid()
    if name == "dirichlet":
        return Dirichlet(alpha=alpha)
    if name == "by_file":
        return ByFile()
    raise ConfigError(f"data.partitioner must be one of iid, dirichlet, by_file, got {name!r}")


def shard_stats(shard: torch.Tensor, shard_sources: torch.Tensor, train: torch.Tensor, vocab_size: int) -> dict:
    """What a peer's data looks like next to the whole training split, for its report: how many sequences and
    sources, the largest source's share, and the KL divergence (bits) of its token frequencies from the split's."""
    ids, counts = torch.unique(shard_sources, return_counts=True)
    mine = torch.bincount(shard.flatten(), minlength=vocab_size).double() + 1.0  # add-one: no log of zero
    every = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    p, q = mine / mine.sum(), every / every.sum()
    return {
        "sequences": len(shard),
        "tokens": int(shard.numel()),
        "sources": len(ids),
        "largest_source_share": round(float(counts.max()) / len(shard), 4) if len(shard) else 0.0,
        "token_kl_bits": round(float((p * (p / q).log2()).sum()), 5),
    }
