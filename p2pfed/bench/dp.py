"""What differential privacy costs one peer: step time and eval loss, DP-SGD vs non-private, measured in one run.

    p2pfed bench dp --config configs/tiny.yaml --steps 300 --target-epsilon 8 [--json]

Both sides are the trainer of `p2pfed peer` on the same shard (the whole corpus: one peer), the same seed and the same
batches: `steps` AdamW steps each, then the eval loss on the validation sequences. The private side takes the noise
multiplier that opacus's accountant (privacy.accountant) says reaches `target_epsilon` at privacy.delta after exactly
`steps` steps of this sample rate, and reports the epsilon it ends at. `step_ratio` is the private side's mean time per
step (forward, backward, per-example clipping, noise, optimizer step) over the non-private side's.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from opacus.accountants.utils import get_noise_multiplier

from p2pfed.actors.trainer import Trainer
from p2pfed.config import Config, Profile
from p2pfed.data import load_corpus

__all__ = ["run_dp_bench"]


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
    sides: dict[str, dict[str, Any]] = {}
    for name, dp in (("plain", False), ("dp", True)):
        side_cfg = cfg.model_copy(
            update={"privacy": p.model_copy(update={"dp": dp, "noise_multiplier": sigma, "target_epsilon": None})}
        )
        torch.manual_seed(cfg.run.seed)  # the same initial weights and noise-free draws on both sides
        trainer = Trainer(side_cfg, Profile(threads=threads), corpus, shard, shard_index=0)
        trainer._build()
        initial = trainer._evaluate()
        t0 = time.perf_counter()
        result = trainer._inner_steps(steps, 0)
        elapsed = time.perf_counter() - t0
        sides[name] = {
            "step_s": elapsed / steps,
            "compute_s": result.compute_s,
            "train_loss": result.loss,
            "initial_eval_loss": initial,
            "eval_loss": trainer._evaluate(),
            "epsilon": trainer.privacy.epsilon() if trainer.privacy is not None else None,
        }
        trainer._executor.shutdown(wait=False)
    return {
        "step_ratio": sides["dp"]["step_s"] / sides["plain"]["step_s"],
        "eval_loss_ratio": sides["dp"]["eval_loss"] / sides["plain"]["eval_loss"],
        "plain_step_s": sides["plain"]["step_s"],
        "dp_step_s": sides["dp"]["step_s"],
        "plain_eval_loss": sides["plain"]["eval_loss"],
        "dp_eval_loss": sides["dp"]["eval_loss"],
        "initial_eval_loss": sides["plain"]["initial_eval_loss"],
        "epsilon": sides["dp"]["epsilon"],
        "delta": p.delta,
        "accountant": p.accountant,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "max_grad_norm": p.max_grad_norm,
        "steps": steps,
        "batch_size": batch,
        "model": f"{cfg.model.arch}-{cfg.model.preset}",
    }
