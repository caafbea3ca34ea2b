"""`p2pfed bench allreduce` runs both sides in one run, checks p2pfed's result against the exact mean, and reports
a ratio that is its two timings divided."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from p2pfed.compression import PowerSGD
from p2pfed.config import load_config
from p2pfed.model import build_model
from tests.conftest import TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("transport", ["libp2p", "tcp-sealed"])
def test_bench_allreduce_json(launcher: Launcher, tmp_path: Path, transport: str) -> None:
    # direct TCP runs sealed with a swarm key here (unsealed, it is the same path less the records: test_butterfly)
    how = ["--transport", "tcp", "--sealed"] if transport == "tcp-sealed" else ["--transport", transport]
    bench = launcher.start(
        "bench", "allreduce", "--peers", "2", "--numel", "100000", "--rounds", "2", *how, "--json", name="bench",
    )  # fmt: skip
    assert bench.wait(timeout=240) == 0, bench.stderr()[-3000:]

    result = json.loads(bench.stdout().strip().splitlines()[-1])
    assert {"p2pfed_s", "gloo_s", "ratio"} <= set(result)
    assert result["p2pfed_s"] > 0 and result["gloo_s"] > 0
    assert result["ratio"] == pytest.approx(result["p2pfed_s"] / result["gloo_s"], rel=1e-6)
    assert 0 < result["allreduce_s"] <= result["p2pfed_s"]  # the data path is part of the whole step
    assert result["allreduce_ratio"] == pytest.approx(result["allreduce_s"] / result["gloo_s"], rel=1e-6)
    assert result["max_abs_error"] < 1e-5  # fp32 all-reduce of N(0,1) data: the exact mean up to rounding
    assert result["sealed"] == (transport == "tcp-sealed")
    # butterfly all-reduce of 2 peers: each sends half its vector and returns half of its averaged slice
    assert result["bytes_sent_per_peer"] >= 4 * 100_000 * (2 - 1) / 2 * 2
    assert wait_no_leftovers(launcher) == []


def test_bench_comm_json(launcher: Launcher, tmp_path: Path) -> None:
    # Execute: a short run of both sides, DiLoCo with rank-1 PowerSGD pseudo-gradients every 5 steps against sync fp32
    bench = launcher.start(
        "bench", "comm", "--peers", "2", "--max-steps", "10", "--run-dir", str(tmp_path / "comm"),
        "--set", "averaging.inner_steps=5", "--set", "compression.name=powersgd", "--set", "compression.rank=1",
        "--json", name="bench",
    )  # fmt: skip
    assert bench.wait(timeout=300) == 0, bench.stderr()[-3000:]

    # Assert: both sides trained the same tokens; the reduction is their bytes per token divided.
    result = json.loads(bench.stdout().strip().splitlines()[-1])
    keys = {"bytes_per_token", "baseline_bytes_per_token", "reduction", "eval_loss", "baseline_eval_loss"}
    assert keys <= set(result)
    assert result["ours"]["tokens_per_peer"] == result["baseline"]["tokens_per_peer"] == 10 * 8 * 64
    assert result["reduction"] == pytest.approx(result["baseline_bytes_per_token"] / result["bytes_per_token"])
    # One round per 5 steps of P and Q per weight matrix (the peers hand the model's layout to the averager) and the
    # norms as they are, against ten rounds of the whole gradient: 5 * numel / (|P| + |Q|), less the framing. As
    # one matrix of the whole vector, the same rank would send about 4x fewer values.
    cfg = load_config(TINY, [])
    shapes = [p.shape for p in build_model(cfg.model, vocab_size=256, seed=0).parameters()]
    numel = sum(math.prod(s) for s in shapes)
    expected = 5 * numel / sum(PowerSGD(rank=1, shapes=shapes).sizes(numel))
    assert 0.9 * expected < result["reduction"] <= expected
    assert result["eval_loss"] > 0 and result["baseline_eval_loss"] > 0
    assert wait_no_leftovers(launcher) == []


def test_hivemind_reference_peers_train_together(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: the reference that `bench wan --runner hivemind` runs, here two peers on loopback
    def args(i: int, extra: list[str]) -> list[str]:
        return [
            "bench", "hivemind-peer", "--config", TINY, "--listen", "/ip4/127.0.0.1/tcp/0", "--index", str(i),
            "--peers", "2", "--max-steps", "2", "--report", str(tmp_path / f"hm{i}.json"), *extra,
        ]  # fmt: skip

    # Execute
    first = launcher.start(*args(0, []), name="hm0")
    second = launcher.start(*args(1, ["--initial-peers", first.bootstrap()]), name="hm1")

    # Assert: both reached 2 optimizer steps of the swarm (hivemind epochs) and learned something
    for peer in (first, second):
        assert peer.wait(timeout=180) == 0, peer.stderr()[-3000:]
    for i in range(2):
        report = json.loads((tmp_path / f"hm{i}.json").read_text())
        assert report["epochs"] >= 2 and report["steps"] >= 2
        assert report["eval_loss"] < report["initial_eval_loss"]
    progress = [json.loads(line) for line in first.stdout().splitlines() if line.startswith('{"kind": "progress"')]
    assert progress and all("eval_loss" in p for p in progress)
    assert wait_no_leftovers(launcher) == []
