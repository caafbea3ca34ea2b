"""What differential privacy costs one peer: step time and eval loss, DP-SGD vs non-private, measured in one run.

    p2pfed bench dp --config configs/tiny.yaml --steps 300 --target-epsilon 8 [--json]

Both sides are the trainer of `p2pfed peer` on the same shard (the whole corpus: one peer), the same seed and the same
batches: `steps` AdamW steps each, then the eval loss on the validation sequences. The private side takes the noise
multiplier that opacus's accountant (privacy.accountant) says reaches `target_epsilon` at privacy.delta after exactly
`steps` steps of this sample rate, and reports the epsilon it ends at. `step_ratio` is the private side's mean time per
step (forward, backward, per-example clipping, noise, optimizer step) over the non-private side's. The two sides take
turns, BLOCK steps at a time, so that both meet the machine in the same states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from opacus.accountants.utils import get_noise_multiplier

from p2pfed.actors.trainer import Trainer
from p2pfed.config import Config, Profile
from p2pfed.data import load_corpus

__all__ = ["run_dp_bench"]

BLOCK = 10  # steps a side runs before the other takes its turn


@dataclass
class _Side:
    trainer: Trainer
    initial_eval_loss: float
    elapsed: float = 0.0  # seconds in its steps
    loss_sum: float = 0.0  # training loss times steps
    eval_loss: float = 0.0


def run_dp_bench(cfg: Config, *, steps: int, target_epsilon: float, threads: int | None = None) -> dict[str, Any]:
    corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
    shard = corpus.partition(index=0, count=1)
    batch = cfg.training.batch_size
    sample_rate = batch / len(shard)
    p = cfg.privacy
    sigma = float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=p.delta, sample_rate=sample_rate, steps=steps,
            accountant=p.accountant,
        )
    )  # fmt: skip
    sides = {}
    for name, dp in (("plain", False), ("dp", True)):
        side_cfg = cfg.model_copy(
            update={"privacy": p.model_copy(update={"dp": dp, "noise_multiplier": sigma, "target_epsilon": None})}
        )
        torch.manual_seed(cfg.run.seed)  # the same initial weights on both sides
        trainer = Trainer(side_cfg, Profile(threads=threads), corpus, shard, shard_index=0)
        trainer._build()
        sides[name] = _Side(trainer, initial_eval_loss=trainer._evaluate())
    # The two sides take turns, BLOCK steps at a time and each going first every other time, so that a change in
    # the machine's speed during the run (other tenants, frequency) reaches both alike
    order = [sides["plain"], sides["dp"]]
    for first in range(0, steps, BLOCK):
        count = min(BLOCK, steps - first)
        for side in order:
            t0 = time.perf_counter()
            result = side.trainer._inner_steps(count, first)
            side.elapsed += time.perf_counter() - t0
            side.loss_sum += result.loss * count
        order.reverse()
    for side in sides.values():
        side.eval_loss = side.trainer._evaluate()
        side.trainer._executor.shutdown(wait=False)
    plain, private = sides["plain"], sides["dp"]
    assert private.trainer.privacy is not None
    return {
        "step_ratio": private.elapsed / plain.elapsed,
        "eval_loss_ratio": private.eval_loss / plain.eval_loss,
        "plain_step_s": plain.elapsed / steps,
        "dp_step_s": private.elapsed / steps,
        "plain_train_loss": plain.loss_sum / steps,
        "dp_train_loss": private.loss_sum / steps,
        "plain_eval_loss": plain.eval_loss,
        "dp_eval_loss": private.eval_loss,
        "initial_eval_loss": plain.initial_eval_loss,
        "epsilon": private.trainer.privacy.epsilon(),
        "delta": p.delta,
        "accountant": p.accountant,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "max_grad_norm": p.max_grad_norm,
        "steps": steps,
        "batch_size": batch,
        "model": f"{cfg.model.arch}-{cfg.model.preset}",
    }
