"""Differential privacy on one peer: DP-SGD with opacus (per-sample clipping, Gaussian noise) and its accountant.

    dp = PeerPrivacy(cfg.privacy, batch_size=8, dataset_size=len(shard), min_group_size=2)
    dp.attach(model, optimizer)            # opacus hooks on the model's layers
    dp.zero_grad()                         # before a step's micro-batches
    loss = dp.backward(model, ids)         # per micro-batch (B_i, T): forward, backward, per-example clipping
    dp.privatize(chunks)                   # p.grad = (sum of clipped per-example grads + noise) / batch size
    dp.epsilon()                           # epsilon spent so far at privacy.delta
    dp.steps_left()                        # private steps until epsilon would pass privacy.target_epsilon

Every gradient that leaves the trainer (averaged every step in sync mode, or folded into a DiLoCo or gossip update)
has been clipped per example to privacy.max_grad_norm (C) and noised with N(0, (sigma C)^2) first, so what other
peers see is post-processing of a DP-SGD release. The accountant (opacus's rdp, prv or gdp) composes one step of
sample rate q = batch_size / examples in this peer's shard and noise multiplier sigma per step.

Batches are fixed-size shuffles of the shard, while the accountants assume Poisson sampling at rate q: the usual
approximation (opacus makes the same when given a plain data loader).

Distributed noise (privacy.distributed_noise, sync mode with secure aggregation): each peer adds noise of std
sigma C / sqrt(m), m = averaging.min_group_size, so the sum of any committed round (at least m peers) carries
sigma C, and only that masked sum is ever seen by others; epsilon is then accounted at sigma. This holds against
observers of the aggregate and assumes the other members add their share.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from p2pfed.config import PrivacyConfig

__all__ = ["PeerPrivacy", "epsilon_after", "steps_within"]


def epsilon_after(accountant: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon that opacus's `accountant` gives for `steps` DP-SGD steps at this noise and sample rate."""
    if steps == 0:
        return 0.0
    acct = create_accountant(accountant)
    acct.history = [(noise_multiplier, sample_rate, steps)]
    return float(acct.get_epsilon(delta=delta))


def steps_within(
    budget: float, accountant: str, *, noise_multiplier: float, sample_rate: float, delta: float, limit: int = 10**7
) -> int:
    """The most steps whose epsilon stays within `budget` (epsilon grows with steps: a binary search)."""

    def fits(k: int) -> bool:
        return (
            epsilon_after(accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=k, delta=delta)
            <= budget
        )

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


@register_grad_sampler(LlamaRMSNorm)
def _rms_norm_grad_sample(
    layer: LlamaRMSNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-example gradient of an RMSNorm's weight (y = w * x / rms(x)): each example's sum over positions of the
    output's gradient times the normalized input. Without it opacus falls back to vmap per module, which cost 5 of
    the 12 ms that DP added to a tiny Llama's step (cProfile, 100 steps)."""
    x = activations[0]
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)
    return {layer.weight: torch.einsum("b...h,b...h->bh", backprops, normed.to(x.dtype))}


class PerExampleGradients:
    """Each example's gradient of every trainable parameter of `model`, in p.grad_sample (B, *p.shape) after each
    backward pass (a list of them after several, one per pass), which opacus's DPOptimizer clips and noises.

    The per-layer arithmetic is opacus's own (its grad samplers, and its vmap fallback for layers it has none for);
    only the capture differs from opacus's GradSampleModule. A forward hook keeps each layer's inputs and puts a
    tensor hook on its output, which hands the output's gradient to the grad sampler. GradSampleModule wraps every
    hooked layer's inputs and outputs in autograd functions for its full backward hooks: on the tiny Llama that doubled
    the time of a forward and backward pass (docs/BENCHMARKS.md, D1). The loss is a mean over the pass's examples."""

    def __init__(self, model: torch.nn.Module) -> None:
        GradSampleModule.validate(model, strict=True)  # opacus's check: no layer that mixes examples (BatchNorm)
        self._current: dict[torch.nn.Parameter, torch.Tensor] = {}  # this pass's per-example gradients so far
        for module in model.modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            sampler = GradSampleModule.GRAD_SAMPLERS.get(type(module))
            if sampler is None:
                prepare_layer(module, batch_first=True)
                sampler = ft_compute_per_sample_gradient
            for p in params:
                p.grad_sample = None  # type: ignore[attr-defined]
            module.register_forward_hook(functools.partial(self._forward, sampler))

    def _forward(self, sampler: Any, module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            activations = [t.detach() for t in inputs]
            output.register_hook(functools.partial(self._backward, sampler, module, activations))

    def _backward(
        self, sampler: Any, module: torch.nn.Module, activations: list[torch.Tensor], grad: torch.Tensor
    ) -> None:
        backprops = grad.detach() * len(grad)  # the mean loss's gradient, as each example's own loss's
        for p, sample in sampler(module, activations, backprops).items():
            if p in self._current:  # a parameter used twice in one pass (tied weights): its examples' sums
                self._current[p] = self._current[p] + sample
            else:
                self._current[p] = sample

    def end_pass(self) -> None:
        """After a backward pass: its per-example gradients join p.grad_sample (a list after several passes), as
        opacus's own hooks leave them."""
        for p, sample in self._current.items():
            p._current_grad_sample = sample  # type: ignore[attr-defined]
            promote_current_grad_sample(p)
        self._current = {}

    def reset(self) -> None:
        """Drop what an unfinished pass captured (a step that failed half-way)."""
        self._current = {}


class PeerPrivacy:
    def __init__(self, cfg: PrivacyConfig, *, batch_size: int, dataset_size: int, min_group_size: int) -> None:
        if dataset_size < batch_size:
            raise ValueError(f"privacy.dp needs a shard of at least batch_size examples, got {dataset_size}")
        self.cfg = cfg
        self.sample_rate = batch_size / dataset_size
        self.noise_multiplier = cfg.noise_multiplier  # what the accountant composes
        share = math.sqrt(min_group_size) if cfg.distributed_noise else 1.0
        self.local_noise_multiplier = cfg.noise_multiplier / share  # what this peer adds
        self.batch_size = batch_size
        self.accountant = create_accountant(cfg.accountant)
        self.steps = 0
        self.max_steps = (
            steps_within(
                cfg.target_epsilon, cfg.accountant, noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate, delta=cfg.delta,
            )
            if cfg.target_epsilon is not None
            else None
        )  # fmt: skip
        self.ghost = cfg.grad_sample_mode == "ghost"
        self._optimizer: DPOptimizer | None = None
        self._loss: DPLossFastGradientClipping | None = None
        self._grads: PerExampleGradients | None = None
        self._params: list[torch.nn.Parameter] = []
        self._clipped: list[torch.Tensor] | None = None  # ghost: the batch's clipped sums so far, per parameter

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Hook `model`'s layers for per-example clipping; `optimizer` stays the one that steps (this only rewrites
        p.grad)."""
        # opacus's hooks on the first layer see no input that requires grad (token ids): torch warns every step
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        options = dict(
            noise_multiplier=self.local_noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
        )
        self._params = [p for p in model.parameters() if p.requires_grad]
        if self.ghost:  # opacus's fast gradient clipping: norms from activations and output grads, then a 2nd pass
            module = GradSampleModuleFastGradientClipping(
                model, max_grad_norm=self.cfg.max_grad_norm, use_ghost_clipping=True, loss_reduction="mean"
            )
            self._optimizer = DPOptimizerFastGradientClipping(optimizer, **options)  # type: ignore[arg-type]
            criterion = torch.nn.CrossEntropyLoss(reduction="mean")
            self._loss = DPLossFastGradientClipping(module, self._optimizer, criterion, loss_reduction="mean")
        else:
            self._grads = PerExampleGradients(model)
            self._optimizer = DPOptimizer(optimizer, **options)  # type: ignore[arg-type]

    def zero_grad(self) -> None:
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)  # also drops the per-example state of the last step
        self._clipped = None
        if self._grads is not None:
            self._grads.reset()

    def backward(self, model: torch.nn.Module, ids: torch.Tensor) -> float:
        """Forward and backward of one micro-batch (B_i, T) of next-token prediction; its mean loss. Each example's
        loss is its mean over tokens, as the model's own loss (all sequences have the same length)."""
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(len(ids), 1)  # per example (GPT-2)
        if self._loss is None:
            loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
            loss.backward()
            assert self._grads is not None
            self._grads.end_pass()
            return float(loss.item())
        logits = model(input_ids=ids, position_ids=positions).logits[:, :-1]  # (B_i, T-1, V)
        targets = ids[:, 1:]
        per_example = self._loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), shape=logits.shape[:2])
        per_example.backward()  # two passes: norms, then the sum of the clipped per-example gradients into p.grad
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if self._clipped is None:
            self._clipped = [g.detach().clone() for g in grads]
        else:
            for total, g in zip(self._clipped, grads, strict=True):
                total.add_(g)
        return float(per_example.loss_per_sample.mean().item())

    def privatize(self, micro_batches: int) -> None:
        """Turn the clipped per-example gradients of one batch (taken in `micro_batches` forward/backward passes)
        into its DP-SGD gradient in p.grad, and account for the step."""
        assert self._optimizer is not None
        if self._clipped is not None:  # ghost: opacus's own state holds one pass; the batch's sum is ours
            for p, total in zip(self._params, self._clipped, strict=True):
                p.grad = total
                p.summed_grad = None  # type: ignore[attr-defined]
        else:  # hooks: opacus divides by expected_batch_size per pass it saw, and the passes are pieces of one batch
            self._optimizer.expected_batch_size = self.batch_size / micro_batches  # type: ignore[assignment]
        self._optimizer.pre_step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.cfg.delta)) if self.steps else 0.0

    def restore(self, steps: int) -> None:
        """Resume the accounting after `steps` private steps at this peer's noise and sample rate (a checkpoint)."""
        self.steps = steps
        self.accountant.history = [(self.noise_multiplier, self.sample_rate, steps)] if steps else []

    def steps_left(self) -> int | None:
        return None if self.max_steps is None else max(0, self.max_steps - self.steps)

    def report(self) -> dict[str, Any]:
        """What anyone needs to recompute epsilon: the peer report's privacy fields."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.cfg.delta,
            "accountant": self.cfg.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "dp_steps": self.steps,
            "max_grad_norm": self.cfg.max_grad_norm,
            "target_epsilon": self.cfg.target_epsilon,
            "distributed_noise": self.cfg.distributed_noise,
        }
