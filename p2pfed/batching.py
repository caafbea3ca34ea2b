"""How much work a peer does per round, sized from measured speed so that fast peers never wait for slow ones.

    controller = BatchController(cfg, profile)
    n = controller.batch(rates, me)            # sync: this peer's share of training.global_batch_size
    s = controller.budget(rates, me)           # sync, share_by time: seconds of compute for the step instead
    h = controller.inner_steps(rates, me)      # diloco: local steps that fit the round's time budget
    m = controller.micro_batch(n, device)      # sequences per forward/backward pass

`rates` maps the peers a step is shared among (this one included) to their measured samples/s: an exponential moving
average of samples over compute time, the emulated slowdown of a profile included. While a sync group stays the
same, it is the table its members gathered in their last round, identical on every member; otherwise what the peers
announced in the DHT.

- sync mode with `training.global_batch_size` B: peer i computes B * r_i / sum_j r_j samples, in whole samples that
  add up to B (largest remainders, at least 1 each), so every peer's compute takes about B / sum_j r_j seconds; the
  all-reduce weights each gradient by its samples, so the step is that of one batch of about B. With
  `training.share_by: time` a peer computes for those B / sum_j r_j seconds instead, as many samples as fit: the
  peers finish together even when their speed wavers within the step (as on shared cores), and the step's batch is
  about B. Without it, every peer computes `training.batch_size`.
- diloco with `averaging.adaptive_inner_steps`: the fastest peer runs `averaging.inner_steps` local steps and peer
  i runs round(inner_steps * r_i / r_max) (at least 1), so every phase takes about as long on every peer; the
  pseudo-gradients are averaged by samples. The swarm's step still advances by inner_steps per round.
- micro-batches: `training.micro_batch_size` when set; else on a GPU the largest power of two up to the batch whose
  forward and backward fit (found by probing once per batch size, an out-of-memory error halves it), and on a CPU
  the batch, capped by the profile's `memory_cap_gb` with an estimate of a sequence's activation memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch

from p2pfed.config import Config, Profile

__all__ = ["BatchController", "activation_bytes", "aligned_budget", "apportion"]

logger = logging.getLogger(__name__)


def activation_bytes(*, seq_len: int, hidden: int, layers: int, heads: int, vocab: int) -> int:
    """Activation memory of one sequence's forward and backward in fp32, estimated after Korthikanti et al. (2022):
    about seq * hidden * (34 + 5 * heads * seq / hidden) bytes per layer in 16 bits, doubled for fp32, plus the
    logits and their gradient."""
    per_layer = seq_len * hidden * (34 + 5 * heads * seq_len / hidden)
    return int(2 * layers * per_layer + 2 * 4 * seq_len * vocab)


def apportion(total: int, rates: Mapping[str, float]) -> dict[str, int]:
    """`total` samples split in proportion to `rates`, in whole samples that add up to `total` (largest remainders;
    ties go by peer id, so every peer that holds the same table computes the same split), each at least 1."""
    whole = sum(rates.values())
    quotas = {peer: total * r / whole for peer, r in rates.items()}
    shares = {peer: max(1, math.floor(q)) for peer, q in quotas.items()}
    order = sorted(rates, key=lambda peer: (-(quotas[peer] - math.floor(quotas[peer])), peer))
    for peer in order[: max(0, total - sum(shares.values()))]:
        shares[peer] += 1
    return shares


def aligned_budget(budget: float, *, started: float, lag: float, now: float) -> float:
    """training.share_by time: the seconds to compute now so that this step ends at `started + lag + budget`, the
    same moment on every member of the last round (`started`: its last member's arrival; `lag`: the mean of the
    members' lags gathered in it; both the same on every member). A moment already past, or more than half a
    budget later than a budget from now, gives the plain budget."""
    left = started + lag + budget - now
    return left if 0.0 < left <= 1.5 * budget else budget


class BatchController:
    def __init__(self, cfg: Config, profile: Profile) -> None:
        self.cfg, self.profile = cfg, profile
        self._fits: dict[int, int] = {}  # batch size -> micro-batch that fitted (GPU probing)

    @property
    def adaptive(self) -> bool:
        a, t = self.cfg.averaging, self.cfg.training
        if a.mode == "diloco":
            return a.adaptive_inner_steps
        return a.mode in ("sync", "hierarchical") and t.global_batch_size is not None

    def batch(self, rates: Mapping[str, float], me: str, *, peers: int = 1) -> int:
        """Samples this peer computes for one sync step; `peers`: how many the step is shared among at least (the
        group size the swarm expects, before their rates are known)."""
        t = self.cfg.training
        if t.global_batch_size is None:
            return t.batch_size
        known = {peer: r for peer, r in rates.items() if r > 0}
        if me not in known or len(known) < max(len(rates), peers):  # someone not measured (or read) yet: equal shares
            return max(1, round(t.global_batch_size / max(1, len(rates), peers)))
        return apportion(t.global_batch_size, known)[me]

    def budget(self, rates: Mapping[str, float], me: str, *, peers: int = 1) -> float | None:
        """training.share_by time: the seconds of compute this peer gives one sync step, the same on every peer that
        holds the same table (global batch / the swarm's samples/s); None until every rate is known."""
        t = self.cfg.training
        known = {peer: r for peer, r in rates.items() if r > 0}
        if t.share_by != "time" or t.global_batch_size is None or me not in known:
            return None
        if len(known) < max(len(rates), peers):
            return None
        return t.global_batch_size / sum(known.values())

    def inner_steps(self, rates: Mapping[str, float], me: str) -> int:
        """Local steps this peer runs in one DiLoCo phase."""
        inner = self.cfg.averaging.inner_steps
        if not self.cfg.averaging.adaptive_inner_steps or rates.get(me, 0.0) <= 0:
            return inner
        fastest = max(rates.values())
        return max(1, min(inner, round(inner * rates[me] / fastest)))

    def micro_batch(self, batch: int, device: torch.device, probe: Callable[[int], None] | None = None) -> int:
        """Sequences per forward/backward pass for a batch of `batch`. `probe(m)` runs one pass of m sequences (a
        GPU peer's trainer gives it; it raises torch.cuda.OutOfMemoryError when m does not fit)."""
        t = self.cfg.training
        if t.micro_batch_size is not None:
            return min(batch, t.micro_batch_size)
        if device.type == "cuda" and probe is not None:
            return self._probe(batch, probe)
        cap = self.profile.memory_cap_gb
        if cap is None:
            return batch
        m = self.cfg.model
        from p2pfed.model import PRESETS

        hidden, layers, heads, _ = PRESETS[m.preset]
        per_sequence = activation_bytes(
            seq_len=m.seq_len,
            hidden=m.hidden_size or hidden,
            layers=m.num_layers or layers,
            heads=m.num_heads or heads,
            vocab=256 if m.tokenizer == "byte" else 50_000,
        )
        return max(1, min(batch, int(cap * 2**30 * 0.5 // per_sequence)))  # half the cap: weights, optimizer, data

    def _probe(self, batch: int, probe: Callable[[int], None]) -> int:
        if batch in self._fits:
            return self._fits[batch]
        m = 1 << (batch.bit_length() - 1)  # the largest power of two <= batch
        while True:
            try:
                probe(min(m, batch))
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if m == 1:
                    raise
                m //= 2
        self._fits[batch] = min(m, batch)
        logger.info("micro-batch %d of %d sequences fits this GPU", self._fits[batch], batch)
        return self._fits[batch]
