"""Text sources, tokenization and per-peer partitions.

The embedded default is this Python's own standard library source (real text nobody here wrote, on every machine
with Python, no download). Local text or JSON lines files load through HF `datasets`. The token stream is cut into
fixed-length sequences; a seeded permutation holds out a validation split shared by all peers, and the partitioner
deals the rest into disjoint shards, a pure function of (source, seed, shard index, shard count):

    corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
    shard = corpus.partition(index=0, count=3)        # (N, T) int64 sequences of this peer
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2pfed.config import DataConfig, ModelConfig
from p2pfed.errors import ConfigError

__all__ = ["Corpus", "load_corpus", "read_texts"]


def _stdlib_texts(max_chars: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise ConfigError(f"no Python sources found under {str(root)!r} for the embedded dataset")
    return texts


def _file_texts(cfg: DataConfig) -> list[str]:
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
    texts: list[str] = []
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
                texts.append(text)
        else:
            ds = load_dataset("text", data_files=name, split="train", sample_by="document")
            texts.extend(ds["text"])
    return texts


def read_texts(cfg: DataConfig) -> list[str]:
    """The documents of the configured source, in a fixed order, cut at cfg.max_chars."""
    texts = _stdlib_texts(cfg.max_chars) if cfg.source == "embedded" else _file_texts(cfg)
    out, total = [], 0
    for text in texts:
        out.append(text[: cfg.max_chars - total])
        total += len(out[-1])
        if total >= cfg.max_chars:
            break
    return out


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

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.hf is None:
            return np.frombuffer("\n\n".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64)
        ids: list[int] = []
        for text in texts:
            ids.extend(self.hf(text, add_special_tokens=False)["input_ids"])
            if self.hf.eos_token_id is not None:
                ids.append(self.hf.eos_token_id)
        return np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True)
class Corpus:
    """All sequences of a source, with the seeded train/validation split."""

    train: torch.Tensor  # (N_train, T) int64
    val: torch.Tensor  # (N_val, T) int64
    vocab_size: int
    digest: str  # sha256 prefix of the token stream: peers of one run should agree on it
    seed: int

    def partition(self, *, index: int, count: int) -> torch.Tensor:
        """IID shard `index` of `count`: disjoint across indices, together covering the training split."""
        if not 0 <= index < count:
            raise ConfigError(f"data.partition_index must be in [0, {count}), got {index}")
        if len(self.train) < count:
            raise ConfigError(f"the corpus has {len(self.train)} training sequences, fewer than {count} partitions")
        return self.train[index::count]


def load_corpus(cfg: DataConfig, model_cfg: ModelConfig, *, seed: int) -> Corpus:
    tokenizer = _Tokenizer(model_cfg.tokenizer)
    tokens = tokenizer.encode(read_texts(cfg))
    seq = model_cfg.seq_len
    n = len(tokens) // seq
    n_val = max(1, int(n * cfg.val_fraction))
    if n - n_val < 1:
        raise ConfigError(f"the data source has {len(tokens)} tokens, too few for sequences of {seq}")
    blocks = torch.from_numpy(tokens[: n * seq].reshape(n, seq).copy())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    return Corpus(
        train=blocks[order[n_val:]],
        val=blocks[order[:n_val]],
        vocab_size=tokenizer.vocab_size,
        digest=digest,
        seed=seed,
    )
