"""Trainer: owns the model, the optimizer and this peer's data shard; torch compute runs in a worker thread.

One step is ComputeGradients (forward/backward over micro-batches into a flat fp32 gradient), then, once the Averager
has averaged that gradient in place, ApplyUpdate (clip, AdamW step). A failed round skips ApplyUpdate: the model only
ever sees complete averages.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from p2pfed.actors.base import Actor
from p2pfed.actors.messages import (
    ApplyOuter,
    ApplyUpdate,
    ComputeGradients,
    DiscardInner,
    Evaluate,
    FlatParams,
    GradientsReady,
    LoadState,
    Perturb,
    RestoreCheckpoint,
    RunInnerSteps,
    SetParams,
    Snapshot,
    TakeCheckpoint,
)
from p2pfed.batching import BatchController
from p2pfed.config import Config, Profile, TrainingConfig
from p2pfed.data import Corpus
from p2pfed.errors import UserError
from p2pfed.model import build_model
from p2pfed.ranks import RankGroup, share_of

if TYPE_CHECKING:
    from p2pfed.privacy import PeerPrivacy

__all__ = ["Trainer", "learning_rate"]

_TIME_PIECES = 8  # training.share_by time: passes per expected share, at least (Trainer._compute_for)


def learning_rate(t: TrainingConfig, step: int) -> float:
    """AdamW's lr for the step that starts at `step` (0-based): a linear warmup over warmup_steps, then constant or
    a cosine/linear decay from lr at the end of warmup to min_lr_ratio x lr at max_steps (and there after it)."""
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "constant" or t.max_steps is None:
        return lr
    progress = min(1.0, max(0.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)))
    left = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1.0 - progress
    return lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * left)


class Trainer(Actor):
    name = "trainer"

    def __init__(self, cfg: Config, profile: Profile, corpus: Corpus, shard: torch.Tensor, *, shard_index: int) -> None:
        super().__init__()
        self.cfg, self.profile, self.corpus, self.shard = cfg, profile, corpus, shard
        self.shard_index = shard_index
        device = profile.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batching = BatchController(cfg, profile)  # micro-batch sizes (the round loop asks it for the rest)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pfed-torch")
        self._lock = threading.Lock()  # guards model and optimizer against state downloads from other threads
        self.step = 0
        self._phase: tuple[int, float] | None = None  # DiLoCo: (first step, monotonic start) of the last phase
        self.samples_seen = 0
        self._cursor = 0
        self._epoch = 0
        self._order = self._shuffle(0)
        self.ranks: RankGroup | None = None  # torchrun: the processes of this peer (p2pfed/ranks.py)
        self._batch_samples = 0

    # --- setup ---------------------------------------------------------------------------------------------------

    async def on_start(self) -> None:
        await self._run(self._build)

    def _build(self) -> None:
        if self.ranks is not None:
            self.device = self.ranks.device
        if self.profile.threads is not None:
            torch.set_num_threads(self.profile.threads)
        self.model = build_model(self.cfg.model, vocab_size=self.corpus.vocab_size, seed=self.cfg.run.seed)
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        t = self.cfg.training
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        # Create AdamW's state now, so that a peer that has not stepped yet can still share a complete state.
        for p in self.params:
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.privacy: PeerPrivacy | None = None
        if self.cfg.privacy.dp:
            from p2pfed.privacy import PeerPrivacy  # opacus takes a second to import: only private peers pay it

            self.privacy = PeerPrivacy(
                self.cfg.privacy,
                batch_size=t.batch_size,
                dataset_size=len(self.shard),
                min_group_size=self.cfg.averaging.min_group_size,
            )
            self.privacy.attach(self.model, self.optimizer)
        self.flat_grad = torch.zeros(self.numel, dtype=torch.float32)
        self.diloco = self.cfg.averaging.mode == "diloco"
        # DiLoCo: the point all peers share (params move away from it during inner steps) and the outer optimizer.
        self.theta_start = [p.detach().clone() for p in self.params] if self.diloco else []
        a = self.cfg.averaging
        # Nesterov needs momentum; outer_momentum 0 with outer_lr 1 is plain model averaging (local SGD, FedAvg).
        self.outer_optimizer = torch.optim.SGD(
            self.params, lr=a.outer_lr, momentum=a.outer_momentum, nesterov=a.outer_momentum > 0
        )
        for p in self.params:
            self.outer_optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.fingerprint = self._fingerprint()

    def _shared_params(self) -> list[torch.Tensor]:
        """The parameters every peer holds identically: the model's (sync) or the outer point theta_start (DiLoCo)."""
        return self.theta_start if self.diloco else [p.detach() for p in self.params]

    def _fingerprint(self) -> float:
        """Sum of squared shared parameters in float64: peers that applied the same updates agree on it to ~1e-7."""
        with torch.no_grad():
            return float(sum(p.double().pow(2).sum() for p in self._shared_params()))

    async def on_stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- data ----------------------------------------------------------------------------------------------------

    def _shuffle(self, epoch: int) -> torch.Tensor:
        seed = (self.cfg.run.seed * 1_000_003 + self.shard_index * 7919 + epoch) % (2**63)
        return torch.randperm(len(self.shard), generator=torch.Generator().manual_seed(seed))

    def _next_batch(self, n: int) -> torch.Tensor:
        rows: list[int] = []
        while len(rows) < n:
            if self._cursor >= len(self._order):
                self._epoch += 1
                self._order, self._cursor = self._shuffle(self._epoch), 0
            take = min(n - len(rows), len(self._order) - self._cursor)
            rows.extend(self._order[self._cursor : self._cursor + take].tolist())
            self._cursor += take
        return self.shard[rows]  # (B, T)

    # --- compute -------------------------------------------------------------------------------------------------

    async def on_ComputeGradients(self, msg: ComputeGradients) -> GradientsReady:
        batch_size = msg.batch_size or self.cfg.training.batch_size
        if msg.budget_s is not None:
            return await self._run(self._compute_for, msg.budget_s, batch_size, msg.rate)
        return await self._run(self._compute, batch_size)

    def _forward_backward(self, batch: torch.Tensor) -> float:
        """Gradients of the mean loss over `batch` (B, T) into p.grad, in micro-batches; returns the mean loss.
        With privacy.dp, p.grad is the batch's DP-SGD gradient (per-example clipped, noised) and the step counts."""
        micro = self.batching.micro_batch(len(batch), self.device, self._probe)
        total_loss = 0.0
        self.model.train()
        if self.privacy is not None:
            self.privacy.zero_grad()
        for p in self.params:
            p.grad = None
        chunks = batch.split(micro)
        for chunk in chunks:
            ids = chunk.to(self.device)
            if self.privacy is None:
                with self._autocast():
                    loss = self.model(input_ids=ids, labels=ids).loss
                (loss * (len(chunk) / len(batch))).backward()
                total_loss += loss.item() * len(chunk)
            else:  # per-example clipping needs each pass's own mean loss
                total_loss += self.privacy.backward(self.model, ids) * len(chunk)
        if self.privacy is not None:
            self.privacy.privatize(len(chunks))
        self._batch_samples = len(batch)
        if self.ranks is not None:  # the mean over every rank's samples, identical on every rank
            self._batch_samples, mean = self.ranks.average_grads(self.params, len(batch), total_loss / len(batch))
            return mean
        return total_loss / len(batch)

    def _autocast(self) -> Any:
        """bf16 autocast on CUDA (training.bf16_autocast); full precision elsewhere."""
        enabled = self.device.type == "cuda" and self.cfg.training.bf16_autocast
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _share(self, batch_size: int) -> int:
        """This rank's part of a batch of the peer's (the whole batch outside torchrun)."""
        return batch_size if self.ranks is None else max(1, share_of(batch_size, self.ranks.rank, self.ranks.world))

    def _lead(self, op: str, args: Sequence[Any] = (), tensors: Sequence[torch.Tensor | None] = ()) -> None:
        """torchrun, rank 0: have the other ranks run the same operation (p2pfed/ranks.py)."""
        if self.ranks is not None and self.ranks.leader:
            self.ranks.lead(op, args, tensors)

    def follow(self, op: str, args: list[Any], tensors: list[torch.Tensor | None]) -> None:
        """torchrun, ranks 1..N-1: run the operation rank 0 leads, with its tensors."""
        if op == "compute":
            self._compute(*args)
        elif op == "compute_for":
            self._compute_for(*args)
        elif op == "inner_steps":
            self._inner_steps(*args)
        elif op == "apply":
            self.flat_grad.copy_(tensors[0])  # type: ignore[arg-type]
            self._apply(*args)
        elif op == "apply_outer":
            self._apply_outer(args[0], args[1], tensors[0], tensors[1], args[2])
        elif op == "set_params":
            self._set_params(args[0], args[1], tensors[0])
        elif op == "discard_inner":
            self._discard_inner()
        elif op == "load_state":
            self._load_state(args[0], [t for t in tensors if t is not None])
        elif op == "restore":
            self._restore(dict(zip(args[1], tensors, strict=True)), args[0])  # type: ignore[arg-type]
        elif op == "perturb":
            self._perturb()
        else:
            raise ValueError(f"rank 0 led an unknown operation {op!r}")

    def _clock(self) -> tuple[float, float]:
        """(wall, CPU) time now: what _slow_down measures a piece of work from."""
        return time.perf_counter(), time.process_time()

    def _slow_down(self, start: tuple[float, float]) -> float:
        """Emulate slower hardware honestly: sleep (slowdown - 1) times the compute the work since `start` took;
        returns its wall time, the sleep included. On a CPU the compute is this process's CPU time: time the
        machine's other processes held the cores is not this peer's hardware being slow, and tripling it (as a
        wall-clock measure did, with three peers on two cores) made the slow peer late by up to 0.2 s."""
        if self.profile.slowdown > 1.0:
            wall, cpu = start
            spent = time.process_time() - cpu if self.device.type == "cpu" else time.perf_counter() - wall
            time.sleep((self.profile.slowdown - 1.0) * spent)
        return time.perf_counter() - start[0]

    def _probe(self, m: int) -> None:
        """One forward and backward of m sequences, gradients discarded: does a micro-batch of m fit (GPU)?"""
        ids = self.shard[:m].to(self.device)
        self.model(input_ids=ids, labels=ids).loss.backward()
        for p in self.params:
            p.grad = None

    def _compute(self, batch_size: int) -> GradientsReady:
        self._lead("compute", [batch_size])
        start = self._clock()
        batch = self._next_batch(self._share(batch_size))
        with self._lock:
            loss = self._forward_backward(batch)
            self._flatten_grads()
        return GradientsReady(
            flat_grad=self.flat_grad, samples=self._batch_samples, loss=loss, compute_s=self._slow_down(start)
        )

    def _compute_for(self, budget_s: float, batch_size: int, rate: float) -> GradientsReady:
        """Forward/backward on as many local sequences as fit in `budget_s` seconds, the emulated slowdown included
        (at least one), and the mean gradient over all of them (training.share_by time). Passes are an eighth of
        `batch_size` (the expected share), at most what fits in memory; the last ones halve what the time left
        holds at the speed measured so far in this step (`rate`, this peer's samples/s, before the first), so the
        compute ends within about one sequence's time of the deadline. Eighths, not bigger passes: measured on
        3 peers of the tiny Llama sharing 2 cores, they left the fast peers waiting 0.044-0.050 of their time
        where passes of at least 4 or 8 sequences left 0.059 and 0.077 and halving from the first pass 0.095
        (docs/BENCHMARKS.md H1), though a pass of few sequences costs more per sequence (3.9 ms for 1 against
        1.6 ms each in 8, one core)."""
        self._lead("compute_for", [budget_s, batch_size, rate])
        t0 = time.perf_counter()
        speed = rate / (self.ranks.world if self.ranks is not None else 1)
        share = self._share(batch_size)  # in pieces, so that the speed measured on the first ones sizes the last
        micro = min(self.batching.micro_batch(share, self.device, self._probe), -(-share // _TIME_PIECES))
        samples, loss_sum = 0, 0.0
        with self._lock:
            self.model.train()
            for p in self.params:
                p.grad = None
            while True:
                elapsed = time.perf_counter() - t0
                if samples:
                    speed = samples / elapsed
                fits = (budget_s - elapsed) * speed  # sequences the time left holds at the speed so far
                if fits < 1 and samples:
                    break
                # the last passes halve what is left, so the end lands within about one sequence of the deadline
                n = micro if speed <= 0 else min(micro, max(1, int(fits / 2) if fits < 2 * micro else micro))
                piece = self._clock()
                ids = self._next_batch(max(n, 1)).to(self.device)
                with self._autocast():
                    loss = self.model(input_ids=ids, labels=ids).loss
                (loss * len(ids)).backward()  # a sum over sequences, divided by all of them below
                loss_sum += loss.item() * len(ids)
                samples += len(ids)
                self._slow_down(piece)
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(samples)
            self._batch_samples, mean = samples, loss_sum / samples
            if self.ranks is not None:  # the mean over every rank's samples, identical on every rank
                self._batch_samples, mean = self.ranks.average_grads(self.params, samples, mean)
            self._flatten_grads()
        return GradientsReady(
            flat_grad=self.flat_grad, samples=self._batch_samples, loss=mean, compute_s=time.perf_counter() - t0
        )

    def _flatten_grads(self) -> None:
        """p.grad of every parameter into flat_grad (zeros for a parameter without one)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                self.flat_grad[offset : offset + n].zero_()
            else:
                self.flat_grad[offset : offset + n].copy_(p.grad.reshape(-1))
            offset += n

    # --- DiLoCo: H local AdamW steps, then the pseudo-gradient (the phase's change, negated) is averaged --------

    async def on_RunInnerSteps(self, msg: RunInnerSteps) -> GradientsReady:
        return await self._run(self._inner_steps, msg.steps, msg.first_step)

    def _inner_steps(self, steps: int, first_step: int) -> GradientsReady:
        """`steps` local steps; flat_grad becomes origin - theta, the pseudo-gradient of this phase. Without
        overlap the phase starts at theta_start; with overlap it also carries the previous, not yet averaged one."""
        self._lead("inner_steps", [steps, first_step])
        self._phase = (first_step, time.monotonic())
        clock = self._clock()
        t = self.cfg.training
        losses = []
        with self._lock:
            origin = [p.detach().clone() for p in self.params]
            for i in range(steps):
                losses.append(self._forward_backward(self._next_batch(self._share(t.batch_size))))
                if t.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
                self._set_lr(first_step + i)
                self.optimizer.step()
            with torch.no_grad():
                offset = 0
                for p, start in zip(self.params, origin, strict=True):
                    n = p.numel()
                    self.flat_grad[offset : offset + n].copy_((start - p.detach()).reshape(-1))
                    offset += n
        return GradientsReady(
            flat_grad=self.flat_grad,
            samples=steps * t.batch_size,
            loss=sum(losses) / len(losses),
            compute_s=self._slow_down(clock),
        )

    async def on_ApplyOuter(self, msg: ApplyOuter) -> None:
        samples = msg.samples if msg.samples is not None else msg.steps * self.cfg.training.batch_size
        await self._run(self._apply_outer, msg.step, msg.steps, msg.averaged, msg.carry, samples)

    def _apply_outer(
        self, step: int, steps: int, averaged: torch.Tensor | None, carry: torch.Tensor | None, samples: int
    ) -> None:
        """Outer Nesterov step of theta_start along `averaged` (None: a failed round, theta_start stays), then
        theta = theta_start - carry: the local phase whose average is still under way (overlap), or nothing."""
        self._lead("apply_outer", [step, steps, samples], [averaged, carry])
        with self._lock, torch.no_grad():
            if averaged is not None:
                offset = 0
                for p, start in zip(self.params, self.theta_start, strict=True):
                    n = p.numel()
                    p.copy_(start)
                    p.grad = averaged[offset : offset + n].view_as(p).to(self.device).clone()
                    offset += n
                self.outer_optimizer.step()
                for p, start in zip(self.params, self.theta_start, strict=True):
                    start.copy_(p.detach())
            offset = 0
            for p, start in zip(self.params, self.theta_start, strict=True):
                n = p.numel()
                p.copy_(start)
                if carry is not None:
                    p.sub_(carry[offset : offset + n].view_as(p).to(self.device))
                offset += n
            self.step = step + steps
            self.samples_seen += samples
            self.fingerprint = self._fingerprint()

    async def on_FlatParams(self, msg: FlatParams) -> torch.Tensor:
        return await self._run(self._flat_params)

    def _flat_params(self) -> torch.Tensor:
        with self._lock, torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])

    async def on_SetParams(self, msg: SetParams) -> None:
        await self._run(self._set_params, msg.step, msg.steps, msg.flat)

    def _set_params(self, step: int, steps: int, flat: torch.Tensor | None) -> None:
        self._lead("set_params", [step, steps], [flat])
        with self._lock, torch.no_grad():
            if flat is not None:
                offset = 0
                for p in self.params:
                    n = p.numel()
                    p.copy_(flat[offset : offset + n].view_as(p))
                    offset += n
            self.step = step + steps
            self.samples_seen += steps * self.cfg.training.batch_size
            self.fingerprint = self._fingerprint()

    async def on_DiscardInner(self, msg: DiscardInner) -> None:
        await self._run(self._discard_inner)

    def _discard_inner(self) -> None:
        """A failed outer round: drop the local progress, back to the point every peer shares."""
        self._lead("discard_inner")
        with self._lock, torch.no_grad():
            for p, start in zip(self.params, self.theta_start, strict=True):
                p.copy_(start)

    def _set_lr(self, step: int) -> None:
        lr = learning_rate(self.cfg.training, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    async def on_ApplyUpdate(self, msg: ApplyUpdate) -> None:
        await self._run(self._apply, msg.step, msg.samples or self.cfg.training.batch_size)

    def _apply(self, step: int, samples: int) -> None:
        self._lead("apply", [step, samples], [self.flat_grad])
        t = self.cfg.training
        with self._lock:
            offset = 0
            for p in self.params:
                n = p.numel()
                p.grad = self.flat_grad[offset : offset + n].view_as(p).to(self.device)
                offset += n
            if t.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
            self._set_lr(step)
            self.optimizer.step()
            self.fingerprint = self._fingerprint()
            self.step = step + 1
            self.samples_seen += samples

    async def on_Evaluate(self, msg: Evaluate) -> float:
        return await self._run(self._evaluate)

    @torch.no_grad()
    def _evaluate(self) -> float:
        t = self.cfg.training
        val = self.corpus.val[: t.eval_sequences]
        losses = []
        with self._lock:
            self.model.eval()
            for chunk in val.split(t.micro_batch_size or t.batch_size):
                ids = chunk.to(self.device)
                losses.append(self.model(input_ids=ids, labels=ids).loss.item() * len(chunk))
        return sum(losses) / len(val)

    async def on_Perturb(self, msg: Perturb) -> None:
        await self._run(self._perturb)

    def _perturb(self) -> None:
        self._lead("perturb")
        with self._lock, torch.no_grad():
            for p in self.params:
                p.add_(torch.randn_like(p) * 1e-2)
            self.fingerprint = self._fingerprint()

    async def on_Snapshot(self, msg: Snapshot) -> dict[str, torch.Tensor]:
        return await self._run(self._snapshot)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return {name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()}

    # --- state sharing -------------------------------------------------------------------------------------------

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = list(self._shared_params())
        for p in self.params:
            state = self.optimizer.state[p]
            tensors += [state["exp_avg"], state["exp_avg_sq"]]
        if self.diloco:
            tensors += [self.outer_optimizer.state[p]["momentum_buffer"] for p in self.params]
        return tensors

    def current_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Called from the averager's thread when another peer downloads our state."""
        with self._lock:
            adam_step = float(self.optimizer.state[self.params[0]]["step"])
            tensors = [t.to("cpu", copy=True) for t in self._state_tensors()]
            # DiLoCo: how far into its phase of inner steps from this state this peer is (0.0 between phases)
            age = time.monotonic() - self._phase[1] if self._phase is not None and self._phase[0] == self.step else 0.0
            return {"step": self.step, "adam_step": adam_step, "numel": self.numel, "phase_age_s": age}, tensors

    async def on_LoadState(self, msg: LoadState) -> None:
        await self._run(self._load_state, msg.metadata, msg.tensors)

    def _load_state(self, metadata: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """ValueError, with nothing changed, when the state does not fit (a truncated download, another model)."""
        ours = self._state_tensors()
        if metadata.get("numel") != self.numel or len(tensors) != len(ours):
            raise ValueError(
                f"downloaded state does not fit this model: {len(tensors)} tensors for {metadata.get('numel')} "
                f"parameters, expected {len(ours)} for {self.numel}"
            )
        for dst, src in zip(ours, tensors, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"downloaded tensor of shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        self._lead("load_state", [metadata], tensors)
        with self._lock, torch.no_grad():
            for dst, src in zip(ours, tensors, strict=True):
                dst.copy_(src)
            for p in self.params:
                self.optimizer.state[p]["step"] = torch.tensor(float(metadata["adam_step"]))
            if self.diloco:  # the model restarts its inner steps from the downloaded shared point
                for p, start in zip(self.params, self.theta_start, strict=True):
                    p.copy_(start)
            self.step = int(metadata["step"])
            self.fingerprint = self._fingerprint()

    # --- checkpoints (p2pfed/checkpoint.py writes and reads the files) ---------------------------------------------

    async def on_TakeCheckpoint(self, msg: TakeCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return await self._run(self._checkpoint)

    def _checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """CPU copies of the model, AdamW's moments and (DiLoCo) the shared point and outer momentum, by name, and
        the step, data position and privacy accounting that go with them."""
        with self._lock, torch.no_grad():
            tensors: dict[str, torch.Tensor] = {}
            for (name, p), start in zip(self._named(), self._shared_params(), strict=True):
                tensors[f"model/{name}"] = p.detach().to("cpu", copy=True)
                state = self.optimizer.state[p]
                tensors[f"adam.exp_avg/{name}"] = state["exp_avg"].to("cpu", copy=True)
                tensors[f"adam.exp_avg_sq/{name}"] = state["exp_avg_sq"].to("cpu", copy=True)
                if self.diloco:
                    tensors[f"diloco.start/{name}"] = start.to("cpu", copy=True)
                    tensors[f"diloco.momentum/{name}"] = self.outer_optimizer.state[p]["momentum_buffer"].to(
                        "cpu", copy=True
                    )
            meta = {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "cursor": self._cursor,
                "epoch": self._epoch,
                "adam_step": float(self.optimizer.state[self.params[0]]["step"]),
                "numel": self.numel,
                "run_id": self.cfg.run.id,
                "mode": self.cfg.averaging.mode,
                "shard_index": self.shard_index,
                "dp_steps": self.privacy.steps if self.privacy is not None else 0,
            }
        return tensors, meta

    async def on_RestoreCheckpoint(self, msg: RestoreCheckpoint) -> None:
        await self._run(self._restore, msg.tensors, msg.meta)

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._lead("restore", [meta, list(tensors)], list(tensors.values()))
        expected = {f"model/{name}" for name, _ in self._named()}
        missing = sorted(expected - set(tensors))
        if meta.get("numel") != self.numel or missing:
            raise UserError(
                f"the checkpoint holds a model of {meta.get('numel')} parameters, this config builds {self.numel}"
                + (f" (no {missing[0]!r} in it)" if missing else "")
                + ": resume with the config it was made with"
            )
        with self._lock, torch.no_grad():
            for (name, p), start in zip(self._named(), self._shared_params(), strict=True):
                p.copy_(tensors[f"model/{name}"])
                state = self.optimizer.state[p]
                state["exp_avg"].copy_(tensors[f"adam.exp_avg/{name}"])
                state["exp_avg_sq"].copy_(tensors[f"adam.exp_avg_sq/{name}"])
                state["step"] = torch.tensor(float(meta["adam_step"]))
                if self.diloco and f"diloco.start/{name}" in tensors:
                    start.copy_(tensors[f"diloco.start/{name}"])
                    self.outer_optimizer.state[p]["momentum_buffer"].copy_(tensors[f"diloco.momentum/{name}"])
            if self.diloco:  # inner steps restart from the shared point
                for p, start in zip(self.params, self.theta_start, strict=True):
                    p.copy_(start)
            self.step = int(meta["step"])
            self.samples_seen = int(meta["samples_seen"])
            if int(meta.get("shard_index", self.shard_index)) == self.shard_index:  # same shard: same place in it
                self._epoch, self._cursor = int(meta["epoch"]), int(meta["cursor"])
                self._order = self._shuffle(self._epoch)
            if self.privacy is not None:
                self.privacy.restore(int(meta.get("dp_steps", 0)))
            self.fingerprint = self._fingerprint()

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def param_l2(self) -> float:
        with self._lock, torch.no_grad():
            return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.params))
