"""Text sources, tokenization and per-peer partitions.

The embedded default is this Python's own standard library source (real text nobody here wrote, on every machine
with Python, no download). Local text or JSON lines files load through HF `datasets`. The token stream is cut into
fixed-length sequences; a seeded permutation holds out a validation split shared by all peers, and the partitioner
(p2pfed/partition.py: iid, dirichlet over sources, by_file) deals the rest into disjoint shards, a pure function of
(source, seed, shard index, shard count):

    corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
    shard = corpus.partition(index=0, count=3)        # (N, T) int64 sequences of this peer
    shard = corpus.partition(index=0, count=3, partitioner="dirichlet", alpha=0.3)
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfed.config import DataConfig, ModelConfig
from p2pfed.errors import ConfigError
from p2pfed.partition import make_partitioner, shard_stats

__all__ = ["Corpus", "load_corpus", "read_documents", "read_texts"]


def _stdlib_texts(max_chars: int) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append((path.name, text))
        total += len(text)
        if total >= max_chars:
            break
    if not docs:
        raise ConfigError(f"no Python sources found under {str(root)!r} for the embedded dataset")
    return docs


def _file_texts(cfg: DataConfig) -> list[tuple[str, str]]:
    from datasets import load_dataset  # imported here: it is slow to import and only file sources need it

    files: list[str] = []
    for pattern in cfg.paths:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for name in matched:
            if not Path(name).is_file():
                raise ConfigError(f"data.paths: {name!r} does not exist")
            files.append(name)
    if not files:
        raise ConfigError(f"data.paths matched no files, got {cfg.paths!r}")
    texts: list[tuple[str, str]] = []
    for name in files:
        if name.endswith((".jsonl", ".json")):
            ds = load_dataset("json", data_files=name, split="train")
            if cfg.text_field not in ds.column_names:
                raise ConfigError(f"data.text_field {cfg.text_field!r} is not a field of {name!r}")
            for row, text in enumerate(ds[cfg.text_field]):
                if not isinstance(text, str):
                    raise ConfigError(
                        f"record {row + 1} of {name!r} has no text in field {cfg.text_field!r}, got {text!r}"
                    )
                texts.append((name, text))
        else:
            ds = load_dataset("text", data_files=name, split="train", sample_by="document")
            texts.extend((name, text) for text in ds["text"])
    return texts


def read_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(source, text) of every document of the configured source, in a fixed order, cut at cfg.max_chars. The
    source is the file a document came from (for the embedded corpus, the stdlib module's file name)."""
    docs = _stdlib_texts(cfg.max_chars) if cfg.source == "embedded" else _file_texts(cfg)
    out, total = [], 0
    for source, text in docs:
        out.append((source, text[: cfg.max_chars - total]))
        total += len(out[-1][1])
        if total >= cfg.max_chars:
            break
    return out


def read_texts(cfg: DataConfig) -> list[str]:
    """The documents of the configured source, in a fixed order, cut at cfg.max_chars."""
    return [text for _, text in read_documents(cfg)]


class _Tokenizer:
    """Byte-level by default (ids 0..255, nothing to download); or a local HF tokenizer directory."""

    def __init__(self, spec: str) -> None:
        self.hf = None
        if spec == "byte":
            self.vocab_size = 256
            return
        if not Path(spec, "tokenizer_config.json").is_file() and not Path(spec, "tokenizer.json").is_file():
            raise ConfigError(f"model.tokenizer must be 'byte' or a local tokenizer directory, got {spec!r}")
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        self.vocab_size = len(self.hf)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids of the documents in order, (D,) offset of each document's first token)."""
        if self.hf is None:
            sizes = [len(t.encode("utf-8")) + 2 for t in texts]  # each document, then the blank line after it
            offsets = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)
            return np.frombuffer("\n\n".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64), offsets
        ids: list[int] = []
        starts: list[int] = []
        for text in texts:
            starts.append(len(ids))
            ids.extend(self.hf(text, add_special_tokens=False)["input_ids"])
            if self.hf.eos_token_id is not None:
                ids.append(self.hf.eos_token_id)
        return np.asarray(ids, dtype=np.int64), np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True)
class Corpus:
    """All sequences of a source, with the seeded train/validation split."""

    train: torch.Tensor  # (N_train, T) int64
    val: torch.Tensor  # (N_val, T) int64
    vocab_size: int
    digest: str  # sha256 prefix of the token stream: peers of one run should agree on it
    seed: int
    train_sources: torch.Tensor | None = None  # (N_train,) int64: the source each training sequence starts in
    source_names: tuple[str, ...] = ()  # source id -> file name

    def partition(self, *, index: int, count: int, partitioner: str = "iid", alpha: float = 0.5) -> torch.Tensor:
        """Shard `index` of `count` (p2pfed/partition.py): disjoint across indices, together covering the training
        split. iid needs no sources; dirichlet and by_file deal by source."""
        return self.train[self.partition_rows(index=index, count=count, partitioner=partitioner, alpha=alpha)]

    def partition_rows(self, *, index: int, count: int, partitioner: str = "iid", alpha: float = 0.5) -> torch.Tensor:
        """The (n,) indices into `train` of shard `index` of `count`."""
        return make_partitioner(partitioner, alpha=alpha).rows(self.sources, index=index, count=count, seed=self.seed)

    def shard_stats(self, rows: torch.Tensor) -> dict[str, Any]:
        """The report's figures for the shard of these rows (p2pfed/partition.py: shard_stats)."""
        return shard_stats(self.train[rows], self.sources[rows], self.train, self.vocab_size)

    @property
    def sources(self) -> torch.Tensor:
        """(N_train,) source id of each training sequence (all 0 when the corpus was built without sources)."""
        if self.train_sources is None:
            return torch.zeros(len(self.train), dtype=torch.int64)
        return self.train_sources


def load_corpus(cfg: DataConfig, model_cfg: ModelConfig, *, seed: int) -> Corpus:
    tokenizer = _Tokenizer(model_cfg.tokenizer)
    docs = read_documents(cfg)
    tokens, starts = tokenizer.encode([text for _, text in docs])
    names = sorted({source for source, _ in docs})
    doc_source = np.asarray([names.index(source) for source, _ in docs], dtype=np.int64)  # (D,)
    seq = model_cfg.seq_len
    n = len(tokens) // seq
    n_val = max(1, int(n * cfg.val_fraction))
    if n - n_val < 1:
        raise ConfigError(f"the data source has {len(tokens)} tokens, too few for sequences of {seq}")
    blocks = torch.from_numpy(tokens[: n * seq].reshape(n, seq).copy())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    # The source of a block is the document its first token belongs to.
    block_doc = np.searchsorted(starts, np.arange(n, dtype=np.int64) * seq, side="right") - 1  # (n,)
    block_source = torch.from_numpy(doc_source[block_doc])
    return Corpus(
        train=blocks[order[n_val:]],
        val=blocks[order[:n_val]],
        vocab_size=tokenizer.vocab_size,
        digest=digest,
        seed=seed,
        train_sources=block_source[order[n_val:]],
        source_names=tuple(names),
    )
