"""Corpus loading, the seeded train/val split and per-peer partitions, checked against plain byte arithmetic.

.venv/bin/python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from p2pfed.config import DataConfig, ModelConfig
from p2pfed.data import Corpus, load_corpus, read_documents, read_texts
from p2pfed.errors import ConfigError

SMALL = DataConfig(max_chars=200_000)  # a few dozen stdlib modules: ~3k sequences of 64 bytes, loads in about a second
MODEL = ModelConfig(seq_len=64)


def _rows(t: torch.Tensor) -> Counter[tuple[int, ...]]:
    """The rows of a (N, T) tensor as a multiset (a corpus can repeat a block, so sets would hide duplicates)."""
    return Counter(tuple(r) for r in t.tolist())


def _reference_blocks(texts: list[str], seq_len: int) -> torch.Tensor:
    """Plain reference of the byte tokenizer: documents joined by a blank line, utf-8 bytes, cut into full blocks."""
    data = "\n\n".join(texts).encode("utf-8")
    n = len(data) // seq_len
    return torch.tensor(list(data[: n * seq_len]), dtype=torch.int64).reshape(n, seq_len)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(SMALL, MODEL, seed=0)


# --- embedded source -------------------------------------------------------------------------------------------------


def test_embedded_sequences_have_the_configured_shape_dtype_and_range(corpus):
    # Assert
    assert corpus.vocab_size == 256
    for split in (corpus.train, corpus.val):
        assert split.dtype == torch.int64
        assert split.ndim == 2 and split.shape[1] == MODEL.seq_len
        assert split.shape[0] > 0
        assert int(split.min()) >= 0 and int(split.max()) < corpus.vocab_size


def test_embedded_text_is_python_source(corpus):
    # Execute
    raw = bytes(torch.cat([corpus.train, corpus.val]).flatten().tolist())

    # Assert
    assert b"def " in raw
    assert b"import " in raw
    assert b"return " in raw


def test_embedded_read_texts_respects_max_chars():
    # Execute
    texts = read_texts(SMALL)

    # Assert
    assert len(texts) > 1
    assert sum(len(t) for t in texts) == SMALL.max_chars


def test_train_and_val_split_every_block_of_the_stream_once(corpus):
    # Prepare
    blocks = _reference_blocks(read_texts(SMALL), MODEL.seq_len)

    # Execute
    train_and_val = torch.cat([corpus.train, corpus.val])

    # Assert: together they hold each block of the token stream exactly once, so they are disjoint
    assert len(corpus.train) + len(corpus.val) == len(blocks)
    assert _rows(train_and_val) == _rows(blocks)
    assert len(corpus.val) == max(1, int(len(blocks) * SMALL.val_fraction))


def test_same_config_and_seed_give_identical_splits(corpus):
    # Execute
    again = load_corpus(SMALL, MODEL, seed=0)

    # Assert
    assert torch.equal(again.train, corpus.train)
    assert torch.equal(again.val, corpus.val)
    assert again.digest == corpus.digest


def test_a_different_seed_gives_a_different_order_of_the_same_blocks(corpus):
    # Execute
    other = load_corpus(SMALL, MODEL, seed=1)

    # Assert
    assert not torch.equal(other.train, corpus.train)
    assert other.digest == corpus.digest  # the token stream is the same; only the order differs
    assert _rows(torch.cat([other.train, other.val])) == _rows(torch.cat([corpus.train, corpus.val]))


# --- partitions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_partitions_cover_the_training_split_exactly_once(corpus, count):
    # Execute
    shards = [corpus.partition(index=i, count=count) for i in range(count)]

    # Assert
    assert sum(len(s) for s in shards) == len(corpus.train)
    assert _rows(torch.cat(shards)) == _rows(corpus.train)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # iid: balanced


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_partitions_are_pairwise_disjoint(count):
    # Prepare: a corpus whose rows are all distinct, so row identity is position identity
    n, seq = 23, 4
    unique = Corpus(
        train=torch.arange(n * seq, dtype=torch.int64).reshape(n, seq),
        val=torch.full((1, seq), -1, dtype=torch.int64),
        vocab_size=n * seq,
        digest="",
        seed=0,
    )

    # Execute
    shards = [set(_rows(unique.partition(index=i, count=count))) for i in range(count)]

    # Assert
    for i in range(count):
        for j in range(i + 1, count):
            assert not shards[i] & shards[j], (i, j)
    assert set().union(*shards) == set(_rows(unique.train))


def test_partition_is_the_same_on_every_call(corpus):
    # Execute / Assert
    assert torch.equal(corpus.partition(index=1, count=3), corpus.partition(index=1, count=3))


@pytest.mark.parametrize(("index", "count"), [(3, 3), (-1, 3), (0, 0), (5, 2)])
def test_bad_partition_index_raises_config_error(corpus, index, count):
    # Execute / Assert
    with pytest.raises(ConfigError, match="partition"):
        corpus.partition(index=index, count=count)


# --- files source ----------------------------------------------------------------------------------------------------


def _numbered_lines(prefix: str, n: int) -> str:
    """Numbered lines with non-ASCII characters, so tokens must be utf-8 bytes rather than characters."""
    return "".join(f"{prefix} ligne n°{i:04d} — ok\n" for i in range(n))


def test_txt_and_jsonl_files_tokenize_to_the_utf8_bytes_of_their_text(tmp_path):
    # Prepare
    txt = _numbered_lines("txt", 40)
    docs = [_numbered_lines(f"doc{k}", 5) for k in range(3)]
    (tmp_path / "a.txt").write_text(txt, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": k}) + "\n" for k, d in enumerate(docs)))
    cfg = DataConfig(source="files", paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], max_chars=100_000)
    model = ModelConfig(seq_len=16)

    # Execute
    texts = read_texts(cfg)
    corpus = load_corpus(cfg, model, seed=0)

    # Assert
    assert texts == [txt, *docs]
    expected = _reference_blocks([txt, *docs], model.seq_len)
    assert _rows(torch.cat([corpus.train, corpus.val])) == _rows(expected)


def test_jsonl_with_a_custom_text_field(tmp_path):
    # Prepare
    docs = [_numbered_lines(f"body{k}", 4) for k in range(4)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"text": "not this", "body": d}) + "\n" for d in docs))
    cfg = DataConfig(source="files", paths=[str(path)], text_field="body")

    # Execute
    corpus = load_corpus(cfg, ModelConfig(seq_len=16), seed=0)

    # Assert
    assert read_texts(cfg) == docs
    assert _rows(torch.cat([corpus.train, corpus.val])) == _rows(_reference_blocks(docs, 16))


def test_glob_pattern_picks_up_files_in_sorted_order(tmp_path):
    # Prepare
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")])

    # Execute
    texts = read_texts(cfg)

    # Assert
    assert texts == ["first file\n", "second file\n"]


def test_missing_file_raises_config_error(tmp_path):
    # Prepare
    cfg = DataConfig(source="files", paths=[str(tmp_path / "missing.txt")])

    # Execute / Assert
    with pytest.raises(ConfigError, match="missing.txt"):
        load_corpus(cfg, MODEL, seed=0)


def test_glob_matching_nothing_raises_config_error(tmp_path):
    # Prepare
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")])

    # Execute / Assert
    with pytest.raises(ConfigError, match="matched no files"):
        load_corpus(cfg, MODEL, seed=0)


def test_wrong_text_field_raises_config_error(tmp_path):
    # Prepare
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = DataConfig(source="files", paths=[str(path)], text_field="content")

    # Execute / Assert
    with pytest.raises(ConfigError, match="'content'"):
        load_corpus(cfg, MODEL, seed=0)


def test_too_little_text_for_one_sequence_raises_config_error(tmp_path):
    # Prepare
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    cfg = DataConfig(source="files", paths=[str(path)])

    # Execute / Assert
    with pytest.raises(ConfigError, match="too few"):
        load_corpus(cfg, ModelConfig(seq_len=64), seed=0)


def test_local_tokenizer_directory(tmp_path):
    # Prepare: a real BPE tokenizer trained on a little stdlib text and saved the way HF saves tokenizers.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = "\n\n".join(read_texts(DataConfig(max_chars=20_000)))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator([sample], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(tmp_path)

    # Execute
    corpus = load_corpus(DataConfig(max_chars=20_000), ModelConfig(tokenizer=str(tmp_path), seq_len=16), seed=0)

    # Assert: the ids are the tokenizer's own encoding of the documents, each followed by <eos>.
    reference = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    expected: list[int] = []
    for text in read_texts(DataConfig(max_chars=20_000)):
        expected += reference(text, add_special_tokens=False)["input_ids"] + [reference.eos_token_id]
    n = len(expected) // 16
    rows = torch.cat([corpus.train, corpus.val]).tolist()
    assert corpus.vocab_size == len(reference)
    assert sorted(rows) == sorted(torch.tensor(expected[: n * 16]).reshape(n, 16).tolist())


# --- partitioners: iid, dirichlet over sources, by_file --------------------------------------------------------------

PARTITIONERS = [("iid", 0.5), ("dirichlet", 0.1), ("dirichlet", 100.0), ("by_file", 0.5)]


def test_each_block_is_labelled_with_the_file_its_first_byte_comes_from(corpus):
    # Prepare: plain arithmetic over the documents joined as the byte tokenizer joins them
    docs = read_documents(SMALL)
    owner = []
    for source, text in docs:
        owner += [source] * (len(text.encode("utf-8")) + 2)
    blocks = _reference_blocks([t for _, t in docs], MODEL.seq_len)
    expected = Counter((tuple(blocks[b].tolist()), owner[b * MODEL.seq_len]) for b in range(len(blocks)))

    # Execute
    labelled = Counter(
        (tuple(row), corpus.source_names[s])
        for row, s in zip(corpus.train.tolist(), corpus.sources.tolist(), strict=True)
    )

    # Assert: every training block carries its own file's name (the split's blocks are a sub-multiset of all blocks)
    assert len(corpus.source_names) == len({s for s, _ in docs}) > 10
    assert sum(labelled.values()) == len(corpus.train)
    assert all(expected[key] >= n for key, n in labelled.items())


@pytest.mark.parametrize(("name", "alpha"), PARTITIONERS)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_partitioners_are_disjoint_covering_and_deterministic(corpus, name, alpha, count):
    # Execute
    rows = [corpus.partition_rows(index=i, count=count, partitioner=name, alpha=alpha) for i in range(count)]
    again = [corpus.partition_rows(index=i, count=count, partitioner=name, alpha=alpha) for i in range(count)]

    # Assert: every training sequence in exactly one partition, and the same partitions on every call
    everything = torch.cat(rows)
    assert torch.equal(torch.sort(everything).values, torch.arange(len(corpus.train)))
    assert all(torch.equal(a, b) for a, b in zip(rows, again, strict=True))
    assert all(len(r) > 0 for r in rows)


def test_by_file_keeps_each_file_whole_and_balances_the_partitions(corpus):
    # Execute
    rows = [corpus.partition_rows(index=i, count=3, partitioner="by_file") for i in range(3)]

    # Assert
    files = [set(corpus.sources[r].tolist()) for r in rows]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    largest_file = int(torch.bincount(corpus.sources).max())
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= largest_file  # greedy largest-first never overshoots by more than one file


def test_dirichlet_skew_grows_as_alpha_shrinks(corpus):
    # Execute: the token-frequency divergence of each shard from the whole split, for several concentrations
    def mean_kl(name: str, alpha: float) -> float:
        stats = [
            corpus.shard_stats(corpus.partition_rows(index=i, count=3, partitioner=name, alpha=alpha)) for i in range(3)
        ]
        return sum(s["token_kl_bits"] for s in stats) / 3

    iid, wide, narrow = mean_kl("iid", 0.5), mean_kl("dirichlet", 100.0), mean_kl("dirichlet", 0.05)

    # Assert: alpha 100 is near iid; alpha 0.05 is far more skewed than either
    assert narrow > 3 * max(iid, wide)


def test_shard_stats_match_plain_counts(corpus):
    # Prepare
    rows = corpus.partition_rows(index=1, count=3, partitioner="dirichlet", alpha=0.3)
    shard, sources = corpus.train[rows], corpus.sources[rows]

    # Execute
    stats = corpus.shard_stats(rows)

    # Assert: against plain Python counting
    mine = Counter(shard.flatten().tolist())
    every = Counter(corpus.train.flatten().tolist())
    p = {t: (mine[t] + 1) / (shard.numel() + 256) for t in range(256)}
    q = {t: (every[t] + 1) / (corpus.train.numel() + 256) for t in range(256)}
    kl = sum(p[t] * math.log2(p[t] / q[t]) for t in range(256))
    assert stats["sequences"] == len(shard) and stats["tokens"] == shard.numel()
    assert stats["sources"] == len(set(sources.tolist()))
    assert stats["largest_source_share"] == pytest.approx(
        max(Counter(sources.tolist()).values()) / len(shard), abs=1e-4
    )
    assert stats["token_kl_bits"] == pytest.approx(kl, abs=1e-4)


def test_a_partition_left_empty_is_a_config_error():
    # Prepare: two sources, five partitions: by_file cannot give every partition a file
    corpus = Corpus(
        train=torch.zeros(10, 4, dtype=torch.int64),
        val=torch.zeros(1, 4, dtype=torch.int64),
        vocab_size=4,
        digest="",
        seed=0,
        train_sources=torch.tensor([0] * 5 + [1] * 5),
        source_names=("a", "b"),
    )

    # Execute / Assert
    with pytest.raises(ConfigError, match="without training sequences"):
        corpus.partition(index=4, count=5, partitioner="by_file")
