"""The reference for `p2pfed bench wan --runner hivemind`: a plain `hivemind.Optimizer` peer on p2pfed's model and data.

    p2pfed bench hivemind-peer --config configs/tiny.yaml --listen /ip4/10.0.0.1/tcp/0 \
        --index 0 --peers 3 --max-steps 200 [--initial-peers MADDR] [--target-batch-size 24] [--set k=v ...]

Same model (built from the config with the run's seed), same shard of the same corpus (partition `index` of
`peers`), same AdamW learning rate and batch size per step, same validation sequences as a p2pfed peer. Each local
step is `opt.step()`: hivemind accumulates gradients until the swarm has `target_batch_size` samples (default: one
step of every peer, the same global batch as p2pfed's sync mode), all-reduces them and steps AdamW. Everything
else is hivemind's default (matchmaking_time 5 s, averaging_timeout 60 s, no compression), except the network
hygiene p2pfed applies everywhere (listen only on --listen, no NAT traversal).

The command prints the same `bootstrap: MADDR` line and `{"kind": "progress", ...}` JSON lines as `p2pfed peer
--events jsonl`, so the WAN harness reads both alike, and writes a report with steps, compute_s, wall_s and
eval_loss. `run_reference_peer` hands those lines to `emit`; the CLI prints them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from p2pfed.errors import UserError

__all__ = ["run_reference_peer"]


def run_reference_peer(
    *,
    config: str,
    overrides: Sequence[str],
    listen: str,
    initial_peers: str | None,
    index: int,
    peers: int,
    max_steps: int,
    target_batch_size: int | None,
    emit: Callable[[str], None],
) -> dict[str, Any]:
    """Train until the swarm has taken `max_steps` optimizer steps (hivemind epochs); return the peer's report."""
    t_start = time.perf_counter()

    import hivemind

    from p2pfed.actors.discovery import start_dht
    from p2pfed.config import load_config
    from p2pfed.data import load_corpus
    from p2pfed.model import build_model

    logging.getLogger("hivemind").setLevel(logging.WARNING)
    cfg = load_config(config, list(overrides))
    t = cfg.training
    torch.set_num_threads(1)
    corpus = load_corpus(cfg.data, cfg.model, seed=cfg.run.seed)
    shard = corpus.partition(index=index, count=peers, partitioner=cfg.data.partitioner, alpha=cfg.data.dirichlet_alpha)
    model = build_model(cfg.model, vocab_size=corpus.vocab_size, seed=cfg.run.seed)
    dht = start_dht(initial_peers=[initial_peers] if initial_peers else [], listen=listen)
    emit(f"bootstrap: {dht.get_visible_maddrs()[0]}")
    _wait_for_peers(dht, f"hivemind_{cfg.run.id}_ready", index=index, peers=peers, timeout=300.0)
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=f"hivemind_{cfg.run.id}",
        params=model.parameters(),
        optimizer=partial(torch.optim.AdamW, lr=t.lr, weight_decay=t.weight_decay),
        batch_size_per_step=t.batch_size,
        target_batch_size=target_batch_size or t.batch_size * peers,
        verbose=False,
    )
    generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + index)
    val = corpus.val[: t.eval_sequences]
    compute_s, eval_loss, step = 0.0, _evaluate(model, val, t.batch_size), 0
    initial_eval = eval_loss
    while opt.local_epoch < max_steps:
        t0 = time.perf_counter()
        batch = shard[torch.randint(len(shard), (t.batch_size,), generator=generator)]  # (B, T)
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        compute_s += time.perf_counter() - t0
        opt.step()  # accumulates, and once the swarm has target_batch_size samples, averages and steps
        opt.zero_grad()
        step += 1
        if step % t.eval_every == 0:
            eval_loss = _evaluate(model, val, t.batch_size)
        progress = {"kind": "progress", "step": step, "epoch": opt.local_epoch, "loss": loss.item()}
        emit(json.dumps(progress | {"eval_loss": eval_loss}))
    eval_loss = _evaluate(model, val, t.batch_size)
    report = {
        "steps": step,
        "epochs": opt.local_epoch,
        "compute_s": round(compute_s, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "eval_loss": eval_loss,
        "initial_eval_loss": initial_eval,
        "bytes_sent": None,
        "rounds_ok": opt.local_epoch,
        "rounds_failed": None,
    }
    opt.shutdown()
    dht.shutdown()
    return report


def _wait_for_peers(dht: Any, key: str, *, index: int, peers: int, timeout: float) -> None:
    """Start together, as p2pfed peers do with swarm.min_peers: else the first peer trains alone for a while."""
    from hivemind.utils import get_dht_time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dht.store(key, subkey=index, value=True, expiration_time=get_dht_time() + timeout)
        found = dht.get(key, latest=True)
        if found is not None and len(found.value) >= peers:
            return
        time.sleep(0.5)
    raise UserError(f"only some of {peers} peers joined within {timeout:.0f}s")


@torch.no_grad()
def _evaluate(model: torch.nn.Module, val: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = sum(model(input_ids=c, labels=c).loss.item() * len(c) for c in val.split(batch_size))
    return total / len(val)
