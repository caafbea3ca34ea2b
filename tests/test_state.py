"""A downloaded state that does not fit (truncated, another model's) is refused whole: the trainer's model and
optimizer stay exactly as they were, and a state that fits replaces them.

.venv/bin/python -m pytest -q tests/test_state.py
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pfed.actors.messages import LoadState
from p2pfed.actors.trainer import Trainer
from p2pfed.config import load_config, load_profile
from p2pfed.data import load_corpus
from tests.conftest import CPU_PROFILE, TINY


def test_a_state_that_does_not_fit_changes_nothing_and_one_that_fits_is_loaded() -> None:
    async def main() -> None:
        # Prepare: a trainer of the tiny config, and its own state as another peer would serve it
        cfg = load_config(TINY)
        corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
        trainer = Trainer(cfg, load_profile(CPU_PROFILE), corpus, corpus.train[:64], shard_index=0)
        await trainer.start()
        try:
            metadata, tensors = trainer.current_state()
            before = [t.clone() for t in trainer.current_state()[1]]

            # Execute + Assert: the first tensors of a download cut short; a full one whose last tensor has the
            # wrong shape (its first tensor changed, which must not land either)
            changed = [t + 1.0 for t in tensors]
            for bad in (changed[:3], [*changed[:-1], torch.zeros(3)]):
                with pytest.raises(ValueError, match="downloaded"):
                    await trainer.ask(LoadState({**metadata, "step": 5}, bad), timeout=30)
                assert trainer.step == 0
                for now, then in zip(trainer.current_state()[1], before, strict=True):
                    assert torch.equal(now, then)

            # Execute + Assert: a state that fits replaces the trainer's
            await trainer.ask(LoadState({**metadata, "step": 5}, changed), timeout=30)
            assert trainer.step == 5
            for now, want in zip(trainer.current_state()[1], changed, strict=True):
                assert torch.equal(now, want)
        finally:
            await trainer.stop()

    asyncio.run(main())
