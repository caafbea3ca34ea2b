"""A peer that spans several processes (`torchrun --nproc-per-node 2 -m p2pfed peer ...`, gloo on CPU) trains with a
plain peer: the two ranks share the peer's batch (its first local gradient equals plain torch's mean over both
ranks' rows), all three models end bit for bit equal, and the swarm sees one peer. The same live swarm serves the
operating checks: the Prometheus endpoint scraped over loopback, and `status --watch --json`.

.venv/bin/python -m pytest -q tests/test_torchrun.py
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from p2pfed.config import load_config
from p2pfed.data import load_corpus
from p2pfed.model import build_model
from p2pfed.report import max_param_divergence
from tests.conftest import CPU_PROFILE, TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS = 140  # long enough for `status` to start (a few seconds) and read four times while the two train
TORCHRUN = ("-m", "torch.distributed.run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reference_first_gradient() -> torch.Tensor:
    """Plain torch: the mean gradient over the first batch of each rank (4 rows each from its half of shard 0)."""
    cfg = load_config(TINY)
    corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
    shard = corpus.train[corpus.partition_rows(index=0, count=2, partitioner="iid", alpha=cfg.data.dirichlet_alpha)]
    model = build_model(cfg.model, vocab_size=corpus.vocab_size, seed=cfg.run.seed)
    model.train()
    total = None
    for rank in (0, 1):
        mine = shard[rank::2]
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003))
        ids = mine[order[:4]]
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        total = flat * 4 if total is None else total + flat * 4
    assert total is not None
    return total / 8


def test_a_two_rank_torchrun_peer_trains_with_a_plain_peer_and_they_agree(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: peer A is a torchrun job of two gloo ranks (8 sequences a step, 4 per rank), peer B a plain process
    def args(name: str, index: int, extra: list[str]) -> list[str]:
        return [
            "peer", "--config", TINY, "--profile", CPU_PROFILE, "--max-steps", str(STEPS), "--events", "jsonl",
            "--set", "swarm.min_peers=2", "--set", "data.num_partitions=2", "--set", f"data.partition_index={index}",
            "--report", str(tmp_path / f"{name}.json"), "--save-params", str(tmp_path / f"{name}.safetensors"), *extra,
        ]  # fmt: skip

    rendezvous = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    a = launcher.start(
        *rendezvous, "-m", "p2pfed", *args("a", 0, ["--metrics-port", "0", "--dump-grads", str(tmp_path / "grads")]),
        name="a", launch=TORCHRUN,
    )  # fmt: skip
    bootstrap = a.bootstrap()
    b = launcher.start(*args("b", 1, ["--initial-peers", bootstrap]), name="b")

    # Execute: while they train, scrape A's metrics and watch the swarm four times, two seconds apart
    url = json.loads(a.wait_for('"kind": "metrics"', 60))["url"]
    a.wait_for('"kind": "progress"', 120)
    deadline = time.monotonic() + 120
    while a.progress_step() < 3:
        assert time.monotonic() < deadline and a.proc.poll() is None, a.stderr()[-3000:]
        time.sleep(0.1)
    with urllib.request.urlopen(url, timeout=10) as response:
        scraped = {
            s.name: s for family in text_string_to_metric_families(response.read().decode()) for s in family.samples
        }
    watch = launcher.start(
        "status", "--initial-peers", bootstrap, "--watch", "--json", "--count", "4", "--interval", "2", name="watch"
    )
    assert watch.wait(timeout=60) == 0, watch.stderr()
    codes = [a.wait(timeout=240), b.wait(timeout=240)]

    # Assert: both finished, trained, and hold the same parameters as A's second rank, bit for bit
    assert codes == [0, 0], [a.stderr()[-3000:], b.stderr()[-3000:]]
    reports = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab"}
    for r in reports.values():
        assert r["final_step"] == STEPS and r["rounds_ok"] >= STEPS - 2
        assert r["eval_loss"] < r["initial_eval_loss"] - 1.0
    assert reports["a"]["samples"] == STEPS * 8  # the peer's batch, shared by its ranks
    files = [tmp_path / "a.safetensors", tmp_path / "a.rank1.safetensors", tmp_path / "b.safetensors"]
    assert max_param_divergence(files) == 0.0

    # Assert: A's first local gradient is the mean over both ranks' rows, as plain torch computes it
    first = min((tmp_path / "grads").iterdir(), key=lambda p: int(p.stem.rsplit("step", 1)[1]))
    assert first.stem.endswith("step0")
    torch.testing.assert_close(load_file(first)["local"], _reference_first_gradient(), rtol=1e-4, atol=1e-6)

    # Assert: the metrics endpoint served A's progress with its labels
    step = scraped["p2pfed_step"]
    assert step.labels["peer"] == reports["a"]["peer_id"] and step.labels["cloud"] == "local"
    assert step.value >= 3 and scraped["p2pfed_samples_total"].value >= 3 * 8
    assert scraped["p2pfed_bytes_sent_total"].value > 0 and scraped["p2pfed_rounds_ok_total"].value >= 2

    # Assert: status --watch saw both peers (never A's second rank), and a byte rate once a peer had announced itself
    # twice (every swarm.announce_every = 2 s) within its four reads, 6 s or more from first to last
    lines = [json.loads(line) for line in watch.stdout().splitlines() if line.startswith("{")]
    assert len(lines) == 4
    (run,) = [r for r in lines[-1]["runs"] if r["run_id"] == "tiny"]
    assert {p["peer_id"] for p in run["peers"]} == {reports["a"]["peer_id"], reports["b"]["peer_id"]}
    assert any(p["bytes_per_s"] and p["bytes_per_s"] > 0 for p in run["peers"]), run["peers"]
    assert wait_no_leftovers(launcher) == []
