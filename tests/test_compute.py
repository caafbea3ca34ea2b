"""A sync step's local work in time shares (training.share_by time): the trainer computes micro-batches until its
time budget is spent, and the gradient it hands the averager is plain torch's mean gradient over exactly the
sequences it took, in its data order; a slower profile takes fewer of them in the same budget.

.venv/bin/python -m pytest -q tests/test_compute.py
"""

from __future__ import annotations

import asyncio

import torch
from torch.testing import assert_close

from p2pfed.actors.messages import ComputeGradients
from p2pfed.actors.trainer import Trainer
from p2pfed.config import load_config, load_profile
from p2pfed.data import load_corpus
from p2pfed.model import build_model
from tests.conftest import CPU_PROFILE, TINY

OVERRIDES = ["training.global_batch_size=48", "training.share_by=time", "training.micro_batch_size=4"]


def _reference(shard: torch.Tensor, order: torch.Tensor, samples: int) -> torch.Tensor:
    """Plain torch: the mean loss over the first `samples` sequences of the trainer's order, differentiated."""
    cfg = load_config(TINY, OVERRIDES)
    model = build_model(cfg.model, vocab_size=256, seed=cfg.run.seed)
    model.train()
    ids = shard[order[:samples]]
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def test_a_time_budget_takes_the_sequences_that_fit_and_averages_their_gradients() -> None:
    async def main() -> None:
        # Prepare: a trainer of the tiny config, and one that emulates hardware 4x slower
        cfg = load_config(TINY, OVERRIDES)
        corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
        shard = corpus.train[:512]
        fast = Trainer(cfg, load_profile(CPU_PROFILE), corpus, shard, shard_index=0)
        slow = Trainer(cfg, load_profile(CPU_PROFILE, ["slowdown=4"]), corpus, shard, shard_index=0)
        for trainer in (fast, slow):
            await trainer.start()
        try:
            order = fast._order.clone()

            # Execute: half a second of compute each, starting from a guess of 100 samples/s
            work = ComputeGradients(batch_size=48, budget_s=0.5, rate=100.0)
            done = [await trainer.ask(work, timeout=60) for trainer in (fast, slow)]

            # Assert: each gradient is the mean over the sequences that trainer took; the slow one took fewer
            for result in done:
                assert result.samples >= 1
                assert_close(result.flat_grad, _reference(shard, order, result.samples), rtol=1e-4, atol=1e-6)
            assert done[1].samples < done[0].samples
        finally:
            for trainer in (fast, slow):
                await trainer.stop()

    asyncio.run(main())
