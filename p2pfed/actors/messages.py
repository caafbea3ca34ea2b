"""Messages between a peer's actors: frozen dataclasses, one per request or event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Announce",
    "ApplyOuter",
    "ApplyUpdate",
    "ComputeGradients",
    "DiscardInner",
    "DownloadState",
    "Evaluate",
    "Event",
    "FlatParams",
    "GetPeers",
    "GradientsReady",
    "LoadState",
    "PeerRecord",
    "Perturb",
    "Progress",
    "RestoreCheckpoint",
    "RoundResult",
    "RunInnerSteps",
    "RunRound",
    "SetGroupSize",
    "SetParams",
    "Snapshot",
    "TakeCheckpoint",
]


# --- Discovery -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerRecord:
    """What a peer announces about itself in the DHT (msgpack-friendly fields only)."""

    peer_id: str
    cloud: str
    device: str
    step: int
    loss: float | None
    samples_per_s: float
    ready: bool = False  # in the rounds: joined, caught up with the swarm, averaging
    finished: bool = False
    maddrs: tuple[str, ...] = ()
    epsilon: float | None = None  # privacy.dp: spent so far (at the run's privacy.delta)
    announced_at: float = 0.0  # DHT time of the announcement this record came from
    joining: bool = False  # about to download the swarm's state: sync rounds hold their group open for it
    bytes_sent: int = 0  # averaging bytes sent so far (status --watch turns it into bytes/s)
    gossip_misses: int = 0  # gossip: rounds in a row without a partner (others then make room for this peer)


@dataclass(frozen=True)
class Announce:
    record: PeerRecord
    now: bool = False  # store at once rather than with the next periodic announcement


@dataclass(frozen=True)
class GetPeers:
    """Reply: list[PeerRecord] of the live peers of this run, this one included."""


# --- Trainer ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeGradients:
    """Forward/backward on the next `batch_size` local sequences (None: training.batch_size). Reply: GradientsReady.
    With `budget_s`: on as many as fit in that many seconds instead (micro-batches sized for `batch_size`, the first
    one cut to what `rate`, this peer's samples/s, says fits)."""

    batch_size: int | None = None
    budget_s: float | None = None
    rate: float = 0.0


@dataclass(frozen=True)
class GradientsReady:
    flat_grad: torch.Tensor  # (P,) fp32, this peer's gradient, owned by the trainer
    samples: int
    loss: float
    compute_s: float


@dataclass(frozen=True)
class ApplyUpdate:
    """Apply the averaged gradient (now in the trainer's flat_grad) as optimizer step `step`, which trained on
    `samples` local sequences (None: training.batch_size)."""

    step: int
    samples: int | None = None


@dataclass(frozen=True)
class RunInnerSteps:
    """DiLoCo: `steps` local optimizer steps from theta_start (global steps first_step...). Reply: GradientsReady
    whose flat_grad is the pseudo-gradient theta_start - theta."""

    steps: int
    first_step: int


@dataclass(frozen=True)
class ApplyOuter:
    """DiLoCo: outer Nesterov step with the averaged pseudo-gradient (None after a failed round), then the model
    is theta_start - carry (carry: the pseudo-gradient of a phase still being averaged); step advances by steps."""

    step: int
    steps: int
    averaged: torch.Tensor | None
    carry: torch.Tensor | None = None
    samples: int | None = None  # local sequences the phase trained on (None: steps x training.batch_size)


@dataclass(frozen=True)
class FlatParams:
    """Reply: a flat fp32 copy (P,) of this peer's parameters."""


@dataclass(frozen=True)
class SetParams:
    """Gossip: parameters become `flat` (None: keep the local ones); the step advances by `steps`."""

    step: int
    steps: int
    flat: torch.Tensor | None


@dataclass(frozen=True)
class DiscardInner:
    """DiLoCo: a failed outer round; return the model to theta_start."""


@dataclass(frozen=True)
class Evaluate:
    """Reply: mean validation loss (float)."""


@dataclass(frozen=True)
class Snapshot:
    """Reply: dict of parameter name -> detached CPU tensor."""


@dataclass(frozen=True)
class Perturb:
    """Test aid (fault injection): add noise to this peer's parameters, as a peer that diverged would have."""


@dataclass(frozen=True)
class LoadState:
    metadata: dict[str, Any]
    tensors: list[torch.Tensor]


@dataclass(frozen=True)
class TakeCheckpoint:
    """Reply: (tensors by name, metadata): a copy of everything needed to resume this peer (p2pfed/checkpoint.py)."""


@dataclass(frozen=True)
class RestoreCheckpoint:
    """Resume from a checkpoint's tensors and metadata (as TakeCheckpoint made them)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


# --- Averager --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRound:
    """Average `flat_grad` in place with the group, weighted by `weight`. Reply: RoundResult."""

    step: int
    flat_grad: torch.Tensor
    weight: float
    fingerprint: float = 0.0  # sum of squared parameters (float64): members at one step must agree on it
    wait_s: float | None = None  # how long a leader may wait for a full group; default averaging.matchmaking_time
    rate: float = 0.0  # this peer's samples/s, gathered so that every member sizes the next step from one table
    lag: float = 0.0  # seconds from the last round's start to this step's compute (training.share_by time)
    # A re-formed round (phases.run_round): the members of the failed round left (base58). Under secure aggregation
    # the new group must be exactly them, each re-forming the same round, and `held` is what this peer holds of the
    # failed round's result (RoundResult.held_pieces), which the new round keeps.
    reform_of: tuple[str, ...] = ()
    held: dict[str, Any] | None = None


@dataclass(frozen=True)
class RoundResult:
    committed: bool
    group_size: int
    reason: str = ""  # why the round failed, empty when committed
    max_group_step: int = -1  # highest step seen in the group; above ours means this peer fell behind
    min_group_step: int = -1  # lowest step seen in the group; below ours means a member is catching up
    diverged: bool = False  # this peer's parameters disagree with the group's majority: it must download state
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_by_cloud: dict[str, int] = field(default_factory=dict)  # remote cloud label -> bytes this peer sent there
    dropped: int = 0  # members' copies this peer's slices dropped (not finite, over the norm bound)
    unreachable: tuple[str, ...] = ()  # members whose part or reply never came whole (dead, or stalled)
    not_joined: tuple[str, ...] = ()  # of those, members that said they never started the all-reduce (alive)
    members: tuple[str, ...] = ()  # the group's peer ids (base58), when a group formed
    waited_s: float = 0.0  # from this peer's arrival at the round to the last member's
    rates: dict[str, float] = field(default_factory=dict)  # members' samples/s as gathered: the same on every member
    started_at: float = 0.0  # DHT time the last member arrived; with `lag`, the same on every member
    lag: float = 0.0  # the mean of the members' gathered lags
    reformed: bool = False  # run again by the members left after members vanished mid-round (phases.run_round)
    retried: bool = False  # run again with the same update after a member never started it (phases.run_round)
    held: bool = False  # a failed round: this peer holds a piece of its result (a reduced or returned piece)
    # a failed masked round: its group id ("round", hex) and, per all-reduce ("phases": name ->), the pieces of its
    # result this peer holds ("pieces": [start, stop, whole] in that vector's coordinates) and their largest |value|
    # ("abs"); None elsewhere
    held_pieces: dict[str, Any] | None = None


@dataclass(frozen=True)
class SetGroupSize:
    """The number of live peers changed: a round may start as soon as this many have joined its group."""

    size: int


@dataclass(frozen=True)
class DownloadState:
    """Reply: (metadata, tensors) from the most advanced peer, or None."""


# --- Monitor ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    step: int
    max_steps: int | None
    loss: float
    eval_loss: float | None
    samples_per_s: float
    group_size: int
    rounds_ok: int
    rounds_failed: int
    epsilon: float | None = None  # privacy.dp: spent so far, at privacy.delta
    waiting_s: float = 0.0  # so far: time spent waiting for other members to arrive at rounds
    samples: int = 0  # samples computed in this round
    samples_total: int = 0  # running totals from here on: what the peer has trained on and sent
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_by_cloud: dict[str, int] = field(default_factory=dict)  # remote cloud label -> bytes sent there


@dataclass(frozen=True)
class Event:
    """A one-line event for the terminal (bootstrap address, joined, state downloaded, finished)."""

    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)
