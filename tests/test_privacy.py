"""Differential privacy (p2pfed/privacy.py): the DP-SGD gradient is the plain-torch clipped per-example mean (noise
aside), micro-batches included; a real peer reports an epsilon that opacus's accountant reproduces from the
report's own fields; and the budget stop fires before epsilon would pass privacy.target_epsilon.

.venv/bin/python -m pytest -q tests/test_privacy.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant

from p2pfed.config import ModelConfig, PrivacyConfig, load_config
from p2pfed.model import build_model
from p2pfed.privacy import PeerPrivacy, epsilon_after, steps_within
from tests.conftest import TINY, Launcher, wait_no_leftovers


def _reference_grads(model: torch.nn.Module, batch: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """Plain torch: each example's own gradient, clipped to `clip` in L2 over all parameters, then the mean."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for row in batch:
        model.zero_grad()
        ids = row[None]
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t.add_(g, alpha=factor)
    return [t / len(batch) for t in total]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dp_gradient_is_the_clipped_per_example_mean_in_micro_batches(arch: str, mode: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, preset="tiny", seq_len=16), vocab_size=256, seed=0)
    for module in model.modules():  # GPT-2's dropout would draw differently in the two computations
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference_model = copy.deepcopy(model)
    batch = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    clip = 0.05  # small enough that every example is clipped
    cfg = PrivacyConfig(dp=True, noise_multiplier=1e-9, max_grad_norm=clip, grad_sample_mode=mode)  # ~no noise
    privacy = PeerPrivacy(cfg, batch_size=len(batch), dataset_size=600, min_group_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    privacy.attach(model, optimizer)

    privacy.zero_grad()
    losses = [privacy.backward(model, chunk) for chunk in batch.split(4)]  # micro-batches of 4 and 2
    privacy.privatize(micro_batches=2)
    with torch.no_grad():
        expected_loss = reference_model(input_ids=batch[:4], labels=batch[:4]).loss.item()
    assert losses[0] == pytest.approx(expected_loss, rel=1e-5)

    expected = _reference_grads(reference_model, batch, clip)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)
    assert privacy.steps == 1
    assert privacy.sample_rate == 6 / 600


def test_a_weight_shared_by_two_layers_gets_the_sum_of_its_per_example_gradients() -> None:
    # A Llama whose output layer is its embedding (tied): one parameter, two layers in the same pass. Each example's
    # gradient of it is the sum of the two layers' parts, or the clipping would see twice the examples.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference_model = copy.deepcopy(model)
    batch = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(2))
    cfg = PrivacyConfig(dp=True, noise_multiplier=1e-9, max_grad_norm=0.05)
    privacy = PeerPrivacy(cfg, batch_size=len(batch), dataset_size=500, min_group_size=2)
    privacy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))

    privacy.zero_grad()
    privacy.backward(model, batch)
    privacy.privatize(micro_batches=1)

    expected = _reference_grads(reference_model, batch, 0.05)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)


def test_bench_dp_trains_both_sides_and_spends_the_target_epsilon() -> None:
    # Execute: a short `p2pfed bench dp` (its function: the CLI only prints it), both sides taking turns in blocks
    from p2pfed.bench.dp import run_dp_bench

    result = run_dp_bench(load_config(TINY), steps=24, target_epsilon=8.0)

    # Assert: the private side spent what opacus says its noise spends in 24 steps, and the ratio is its own timings
    assert result["epsilon"] == pytest.approx(8.0, rel=0.01)
    assert result["epsilon"] == pytest.approx(
        epsilon_after(
            result["accountant"], noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"],
            steps=24, delta=result["delta"],
        ),
        rel=1e-9,
    )  # fmt: skip
    assert result["step_ratio"] == pytest.approx(result["dp_step_s"] / result["plain_step_s"], rel=1e-9)
    for side in ("plain", "dp"):
        assert result[f"{side}_eval_loss"] < result["initial_eval_loss"]  # both sides trained


def test_steps_within_is_the_largest_count_inside_the_budget() -> None:
    q, sigma, delta = 0.01, 1.0, 1e-5
    k = steps_within(2.0, "rdp", noise_multiplier=sigma, sample_rate=q, delta=delta)
    assert epsilon_after("rdp", noise_multiplier=sigma, sample_rate=q, steps=k, delta=delta) <= 2.0
    assert epsilon_after("rdp", noise_multiplier=sigma, sample_rate=q, steps=k + 1, delta=delta) > 2.0


@pytest.mark.slow
def test_a_peer_reports_a_reproducible_epsilon_and_stops_at_its_budget(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: a budget that runs out after a few dozen steps of this shard (sample rate about 1.3e-4)
    target = 1.51
    # Execute
    peer = launcher.start(
        "swarm", "--peers", "1", "--config", TINY, "--max-steps", "500",
        "--set", "privacy.dp=true", "--set", "privacy.noise_multiplier=0.6",
        "--set", f"privacy.target_epsilon={target}",
        "--run-dir", str(tmp_path / "run"), "--report", str(tmp_path / "report.json"), name="dp",
    )  # fmt: skip
    assert peer.wait(timeout=300) == 0, peer.stdout()[-3000:]

    # Assert: the peer stopped on its budget, said so, and its epsilon follows from its own report
    (report,) = json.loads((tmp_path / "report.json").read_text())["peers"]
    assert "privacy budget exhausted" in (tmp_path / "run" / "peer-0.log").read_text()
    assert report["stopped"] == "privacy budget exhausted"
    assert 0 < report["dp_steps"] == report["final_step"] < 500
    accountant = create_accountant(report["accountant"])
    for _ in range(report["dp_steps"]):
        accountant.step(noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"])
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta=report["delta"]), rel=1e-9)
    assert report["epsilon"] <= target
    accountant.step(noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"])
    assert accountant.get_epsilon(delta=report["delta"]) > target  # one more step would have passed the budget
    assert wait_no_leftovers(launcher) == []


def test_distributed_noise_splits_sigma_over_the_smallest_group_and_needs_masking() -> None:
    from p2pfed.config import load_config
    from p2pfed.errors import ConfigError

    cfg = PrivacyConfig(dp=True, noise_multiplier=2.0, distributed_noise=True, secure_aggregation=True)
    privacy = PeerPrivacy(cfg, batch_size=8, dataset_size=800, min_group_size=4)
    assert privacy.local_noise_multiplier == pytest.approx(1.0)  # 2 / sqrt(4): four shares sum to sigma 2
    assert privacy.noise_multiplier == 2.0  # what the accountant composes
    with pytest.raises(ConfigError, match="distributed_noise needs"):
        load_config(TINY, ["privacy.dp=true", "privacy.distributed_noise=true"])
