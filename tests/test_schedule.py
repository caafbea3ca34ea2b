"""The learning-rate schedule (training.lr_schedule) against torch's own schedulers, and a trainer that follows it.

.venv/bin/python -m pytest -q tests/test_schedule.py
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pfed.actors.messages import ApplyUpdate, ComputeGradients, RunInnerSteps
from p2pfed.actors.trainer import Trainer, learning_rate
from p2pfed.config import load_config, load_profile
from p2pfed.data import load_corpus
from tests.conftest import CPU_PROFILE, TINY


def _torch_lrs(kind: str, *, lr: float, warmup: int, steps: int, ratio: float) -> list[float]:
    """Plain torch: LinearLR warmup from lr / warmup, then CosineAnnealingLR or LinearLR down to ratio x lr."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    decay: torch.optim.lr_scheduler.LRScheduler
    if kind == "cosine":
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=lr * ratio)
    else:
        decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, ratio, total_iters=steps - warmup)
    parts: list[torch.optim.lr_scheduler.LRScheduler] = [decay]
    if warmup:
        parts.insert(0, torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, total_iters=warmup - 1))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, parts, milestones=[warmup]) if warmup else decay
    lrs = []
    for _ in range(steps + 5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedules_match_torchs_schedulers(kind: str, warmup: int) -> None:
    # Prepare
    steps, ratio = 100, 0.1
    t = load_config(TINY, [f"training.lr_schedule={kind}", f"training.warmup_steps={warmup}",
                           f"training.max_steps={steps}", f"training.min_lr_ratio={ratio}"]).training  # fmt: skip

    # Execute
    ours = [learning_rate(t, s) for s in range(steps + 5)]
    reference = _torch_lrs(kind, lr=t.lr, warmup=warmup, steps=steps, ratio=ratio)

    # Assert: the same lr at every step, warmup and the steps past the end (held at the floor) included
    torch.testing.assert_close(torch.tensor(ours[:steps]), torch.tensor(reference[:steps]), rtol=1e-6, atol=0.0)
    assert ours[steps:] == [pytest.approx(t.lr * ratio)] * 5


def test_constant_schedule_keeps_the_lr_after_warmup() -> None:
    t = load_config(TINY, ["training.warmup_steps=4", "training.max_steps=50"]).training
    assert [learning_rate(t, s) for s in range(6)] == pytest.approx([t.lr * k / 4 for k in (1, 2, 3, 4, 4, 4)])


@pytest.mark.parametrize("mode", ["sync", "diloco"])
def test_a_trainer_steps_with_the_scheduled_lr(mode: str) -> None:
    async def main() -> None:
        # Prepare: a cosine schedule over 20 steps
        cfg = load_config(TINY, ["training.lr_schedule=cosine", "training.max_steps=20", f"averaging.mode={mode}"])
        corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
        trainer = Trainer(cfg, load_profile(CPU_PROFILE), corpus, corpus.train[:256], shard_index=0)
        await trainer.start()
        try:
            # Execute: sync steps 0..4, or one DiLoCo phase of 5 inner steps
            if mode == "sync":
                for step in range(5):
                    await trainer.ask(ComputeGradients(batch_size=8), timeout=60)
                    await trainer.ask(ApplyUpdate(step, samples=8), timeout=60)
            else:
                await trainer.ask(RunInnerSteps(steps=5, first_step=0), timeout=60)

            # Assert: the last step (step 4) ran with the schedule's lr for it
            assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(cfg.training, 4))
            assert learning_rate(cfg.training, 4) < cfg.training.lr
        finally:
            await trainer.stop()

    asyncio.run(main())
