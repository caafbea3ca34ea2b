"""Typed run configuration and peer profiles.

A run config (`configs/*.yaml`) is one complete description of a run: model, data, training, averaging, swarm. A peer
profile (`peers/*.yaml`) says what one machine brings. Both reject unknown keys and name the bad value:

    cfg = load_config("configs/tiny.yaml", overrides=["averaging.timeout=30"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from p2pfed.errors import ConfigError

__all__ = [
    "AveragingConfig",
    "CheckpointConfig",
    "CompressionConfig",
    "Config",
    "CostConfig",
    "DataConfig",
    "ModelConfig",
    "PrivacyConfig",
    "Profile",
    "RunConfig",
    "SwarmConfig",
    "TrainingConfig",
    "apply_overrides",
    "check_initial_peers",
    "load_config",
    "load_profile",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    id: str = Field(
        "p2pfed", min_length=1, pattern=r"^[A-Za-z0-9_\-]+$", description="run name; peers of one run share it"
    )
    seed: int = Field(0, ge=0, description="seed for model init and data order; identical on every peer")


class ModelConfig(_Section):
    arch: Literal["llama", "gpt2"] = Field("llama", description="transformers architecture built from a config")
    preset: Literal["tiny", "small", "base", "1b"] = Field("tiny", description="size preset; fields below override it")
    path: str | None = Field(None, description="local directory of a saved transformers model; replaces arch/preset")
    hidden_size: int | None = Field(None, ge=8, description="width; default: the preset's")
    num_layers: int | None = Field(None, ge=1, description="transformer blocks; default: the preset's")
    num_heads: int | None = Field(None, ge=1, description="attention heads (divide hidden_size); default: the preset's")
    intermediate_size: int | None = Field(None, ge=8, description="Llama MLP width (GPT-2 uses 4 x hidden)")
    seq_len: int = Field(64, ge=8, description="tokens per training sequence")
    tokenizer: str = Field(
        "byte", description="'byte' (256 ids, nothing to download) or a local HF tokenizer directory"
    )


class DataConfig(_Section):
    source: Literal["embedded", "files"] = Field(
        "embedded", description="'embedded': this Python's standard library sources; 'files': the paths below"
    )
    paths: list[str] = Field(default_factory=list, description="text (.txt) or JSON lines (.jsonl) files, or globs")
    text_field: str = Field("text", description="field holding the text in JSON lines records")
    max_chars: int = Field(8_000_000, ge=10_000, description="read at most this many characters of the source")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="held-out share of sequences used for eval loss")
    partitioner: Literal["iid", "dirichlet", "by_file"] = Field(
        "iid",
        description="how training sequences are dealt to peers: 'iid' (every peer the same mix), 'dirichlet' (of "
        "each source file a share drawn from Dirichlet(dirichlet_alpha): non-IID), 'by_file' (whole source files)",
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0.0, description="dirichlet: concentration; small (0.1) gives each peer few sources, large (100) ~iid"
    )
    num_partitions: int | None = Field(None, ge=1, description="default: swarm.min_peers")
    partition_index: int | None = Field(None, ge=0, description="this peer's shard; default: derived from its id")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "files" and not self.paths:
            raise ValueError("data.paths must list at least one file when data.source is 'files'")
        if self.partition_index is not None and self.num_partitions is not None:
            if self.partition_index >= self.num_partitions:
                raise ValueError(
                    f"data.partition_index must be < data.num_partitions ({self.num_partitions}), "
                    f"got {self.partition_index}"
                )
        return self


class TrainingConfig(_Section):
    batch_size: int = Field(
        8, ge=1, description="sequences per peer per step (a torchrun peer shares them among its ranks)"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="sequences per forward/backward; default: the batch, or what fits (p2pfed/batching.py)"
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="sync mode: the swarm's batch per step, shared among peers in proportion to their measured "
        "samples/s so all finish together; null: every peer computes batch_size",
    )
    share_by: Literal["samples", "time"] = Field(
        "samples",
        description="with global_batch_size: 'samples': each peer computes its share, in whole samples that add up "
        "to it; 'time': each peer computes for as long as the swarm needs for it at the peers' measured samples/s, "
        "so all finish at once whatever their speed does meanwhile, and the step's batch is about global_batch_size",
    )
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip the averaged gradient to this L2 norm")
    warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warmup from lr / warmup_steps")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="learning rate after warmup: 'constant', or a 'cosine' or 'linear' decay that reaches "
        "min_lr_ratio x lr at the run's last step (training.max_steps or --max-steps, which it then needs); DiLoCo's "
        "inner steps follow it by the swarm's step",
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="lr_schedule cosine or linear: the final lr / lr")
    eval_every: int = Field(10, ge=1, description="steps between eval-loss measurements")
    eval_sequences: int = Field(64, ge=1, description="validation sequences per eval (the same on every peer)")
    max_steps: int | None = Field(None, ge=1, description="global step at which peers stop; --max-steps overrides")
    bf16_autocast: bool = Field(True, description="on CUDA devices, forward passes under bf16 autocast")


class CompressionConfig(_Section):
    name: Literal["none", "fp16", "uint8", "randomk", "topk", "powersgd"] = Field(
        "none",
        description="how updates cross the wire: 'none' (fp32), 'fp16', 'uint8' (8-bit, per-chunk scale, stochastic "
        "rounding), 'randomk' (shared-seed random coordinates), 'topk' (largest coordinates), 'powersgd' (low rank)",
    )
    ratio: float = Field(0.01, gt=0.0, le=1.0, description="randomk and topk: share of coordinates kept")
    rank: int = Field(4, ge=1, description="powersgd: rank of the approximation of each weight matrix")
    error_feedback: bool = Field(
        True, description="randomk, topk and powersgd: add what compression dropped to the next round's update"
    )

    @property
    def sparse(self) -> bool:
        """True for compressors that keep a small part of the update (fine for updates, ruinous for parameters)."""
        return self.name in ("randomk", "topk", "powersgd")


class AveragingConfig(_Section):
    mode: Literal["sync", "diloco", "gossip", "hierarchical"] = Field(
        "sync",
        description="'sync': average gradients every step; 'diloco': inner_steps local AdamW steps, then average the "
        "pseudo-gradient and take an outer Nesterov step; 'gossip': inner_steps local steps, then average parameters "
        "with whichever gossip_group_size peers are ready, no global barrier; 'hierarchical': as sync, but peers "
        "average inside their profile's cloud first, then one delegate per cloud across clouds, then back",
    )
    inner_steps: int = Field(50, ge=1, description="diloco and gossip: local steps per round (H)")
    gossip_group_size: int = Field(2, ge=2, description="gossip: peers per averaging group")
    outer_lr: float = Field(0.7, gt=0.0, description="diloco: outer learning rate (DiLoCo paper: 0.7)")
    outer_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="diloco: outer Nesterov momentum (paper: 0.9)")
    adaptive_inner_steps: bool = Field(
        False,
        description="diloco: the fastest peer runs inner_steps local steps per phase, a slower one as many as fit in "
        "the same time (in proportion to its measured samples/s); pseudo-gradients are averaged by samples",
    )
    overlap: bool = Field(
        False,
        description="diloco: average a phase's pseudo-gradient while the next phase trains; the outer update "
        "lands one phase late",
    )
    timeout: float = Field(30.0, gt=0.0, description="seconds an all-reduce may take before the round fails")
    matchmaking_time: float = Field(
        5.0, gt=0.0, description="seconds a round waits for missing live peers before averaging without them"
    )
    request_timeout: float = Field(3.0, gt=0.0, description="seconds for one matchmaking request")
    round_timeout: float = Field(60.0, gt=0.0, description="seconds a whole round (matchmaking + all-reduce) may take")
    catchup_grace: float = Field(
        5.0, gt=0.0, description="after a round with a member behind, seconds to hold the next group open for it"
    )
    target_group_size: int | None = Field(
        None, ge=2, description="largest averaging group; default: every live peer of the run"
    )
    min_group_size: int = Field(2, ge=2, description="smallest group that may commit a round")
    transport: Literal["libp2p", "tcp"] = Field(
        "libp2p",
        description="how averaging bytes travel: 'libp2p' (encrypted streams through the p2p daemon, reachable "
        "behind NAT) or 'tcp' (direct TCP between averagers, several times faster; sealed with AES-GCM when the run "
        "has privacy.swarm_key, else unencrypted: for a private network or VPN); peers without a TCP endpoint are "
        "still reached over libp2p",
    )
    tcp_port: int = Field(0, ge=0, le=65535, description="transport tcp: port the averager listens on (0: any)")
    schedule: Literal["butterfly", "ring"] = Field(
        "butterfly",
        description="how a group all-reduces: 'butterfly' (each member reduces a slice from every member's own copy, "
        "so reducers can screen each copy) or 'ring' (each member sends only to the next, one flow per link: faster "
        "on links shaped per peer with 3+ peers; members screen only their own update, so aggregation must be mean, "
        "and every member must accept connections, else a round goes by butterfly; so do top-k's sparse rounds; in "
        "hierarchical mode only the delegates' leg across clouds goes around the ring)",
    )
    max_update_norm: float | None = Field(
        1e4,
        gt=0.0,
        description="a member's update (gradient or pseudo-gradient) with a larger L2 norm is dropped by the reducers "
        "before it reaches a sum, as is any update that is not finite (null: finiteness only); gossip, which "
        "averages parameters, checks finiteness only",
    )
    aggregation: Literal["mean", "trimmed_mean", "centered_clip"] = Field(
        "mean",
        description="sync mode, dense compression: how reducers combine members' updates: 'mean' (weighted by "
        "samples), 'trimmed_mean' (coordinate-wise, trim_ratio cut from each end), 'centered_clip' (clip_radius)",
    )
    trim_ratio: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share of members cut from each end")
    clip_radius: float = Field(1.0, gt=0.0, description="centered_clip: L2 radius of a member's pull per piece")

    @model_validator(mode="after")
    def _check(self) -> AveragingConfig:
        longest_wait = max(self.matchmaking_time, self.catchup_grace)
        if self.round_timeout <= longest_wait:
            raise ValueError(
                "averaging.round_timeout must exceed averaging.matchmaking_time and averaging.catchup_grace "
                f"({longest_wait}), got {self.round_timeout}"
            )
        return self


class PrivacyConfig(_Section):
    dp: bool = Field(
        False,
        description="DP-SGD on every peer (opacus): clip each example's gradient to max_grad_norm and add Gaussian "
        "noise before anything leaves the peer; epsilon is accounted per peer",
    )
    noise_multiplier: float = Field(1.0, gt=0.0, description="dp: noise std as a multiple of max_grad_norm (sigma)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="dp: per-example gradient clipping norm (C)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="dp: the delta epsilon is reported at")
    target_epsilon: float | None = Field(
        None, gt=0.0, description="dp: privacy budget; the peer stops before a step would take epsilon past it"
    )
    accountant: Literal["rdp", "prv", "gdp"] = Field("rdp", description="dp: opacus accountant that composes steps")
    grad_sample_mode: Literal["hooks", "ghost"] = Field(
        "hooks",
        description="dp: how opacus clips each example: 'hooks' (per-example gradients of every layer) or 'ghost' "
        "(per-example norms without per-example gradients, then a second backward pass: less memory on wide layers)",
    )
    distributed_noise: bool = Field(
        False,
        description="dp with secure_aggregation, sync mode: each peer adds noise_multiplier / sqrt(averaging."
        "min_group_size) of the noise, so that each round's masked sum carries the full noise",
    )
    swarm_key: str | None = Field(
        None,
        description="path of a swarm key file (`p2pfed keygen`): DHT records are sealed with it and only peers that "
        "hold it are placed in averaging groups or served state",
    )
    allow: list[str] = Field(
        default_factory=list, description="peer ids (base58) admitted to averaging and state sharing; empty: anyone"
    )
    revoke: list[str] = Field(default_factory=list, description="peer ids never admitted, even with the swarm key")
    secure_aggregation: bool = Field(
        False,
        description="mask each update with pairwise X25519/ChaCha20 masks in a fixed-point ring, so a peer that "
        "reduces a slice sees noise; the group's mean is exact. Works with compression none, fp16, uint8, randomk "
        "and powersgd",
    )


class SwarmConfig(_Section):
    min_peers: int = Field(1, ge=1, description="peers that must be live before the first step")
    join_timeout: float = Field(120.0, gt=0.0, description="seconds to wait for min_peers before giving up")
    announce_every: float = Field(2.0, gt=0.0, description="seconds between this peer's DHT announcements")
    record_ttl: float = Field(10.0, gt=0.0, description="seconds an announcement stays live without renewal")
    bootstrap_retry_s: float = Field(
        18.0, gt=0.0, description="seconds a starting peer keeps dialling --initial-peers before it gives up"
    )
    listen: str = Field("/ip4/127.0.0.1/tcp/0", description="multiaddr the DHT and averager listen on")


class CheckpointConfig(_Section):
    dir: str | None = Field(
        None, description="directory for this peer's checkpoints (safetensors, written atomically); null: none"
    )
    every_s: float = Field(600.0, gt=0.0, description="seconds between checkpoints; one more is written on shutdown")
    keep: int = Field(2, ge=1, description="newest checkpoints kept; older ones are deleted after each save")


class CostConfig(_Section):
    """Prices for `p2pfed report`'s egress estimate. Defaults: list prices of the first tier of internet egress from
    a US region, as the providers publish them (2026): AWS EC2 data transfer out to the internet, first 10 TB a
    month; Google Cloud premium tier internet egress, first TiB a month; Azure internet egress, first 10 TB a
    month. Check your contract's prices and set them here."""

    egress_usd_per_gb: dict[str, float] = Field(
        default_factory=lambda: {"aws": 0.09, "gcp": 0.12, "azure": 0.087, "local": 0.0, "onprem": 0.0},
        description="dollars per GB (10^9 bytes) a cloud bills for bytes its peers send to another cloud, by cloud "
        "label or the label's part before the first '-'",
    )
    default_usd_per_gb: float = Field(0.09, ge=0.0, description="price for a cloud label not in egress_usd_per_gb")
    intra_cloud_usd_per_gb: float = Field(
        0.0, ge=0.0, description="price between peers with the same cloud label (e.g. 0.02 across AWS regions)"
    )

    @model_validator(mode="after")
    def _check(self) -> CostConfig:
        for cloud, price in self.egress_usd_per_gb.items():
            if price < 0:
                raise ValueError(f"cost.egress_usd_per_gb[{cloud!r}] must be >= 0, got {price}")
        return self


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

    @model_validator(mode="after")
    def _check_modes(self) -> Config:
        if self.privacy.distributed_noise and not (
            self.privacy.dp and self.privacy.secure_aggregation and self.averaging.mode == "sync"
        ):
            raise ValueError(
                "privacy.distributed_noise needs privacy.dp and privacy.secure_aggregation on, and averaging.mode "
                "sync (only a masked sum of noised gradients carries the full noise)"
            )
        if self.privacy.secure_aggregation and self.compression.name == "topk":
            raise ValueError(
                "privacy.secure_aggregation cannot mask compression.name 'topk' (each peer keeps different "
                "coordinates): use none, fp16, uint8, randomk or powersgd"
            )
        if self.privacy.secure_aggregation and self.averaging.mode == "hierarchical":
            raise ValueError(
                "privacy.secure_aggregation does not work with averaging.mode 'hierarchical' yet: use sync, diloco "
                "or gossip"
            )
        if self.averaging.aggregation != "mean" and not (
            self.averaging.mode == "sync"
            and self.compression.name in ("none", "fp16", "uint8")
            and not self.privacy.secure_aggregation
        ):
            raise ValueError(
                f"averaging.aggregation {self.averaging.aggregation!r} needs averaging.mode sync, compression none, "
                "fp16 or uint8, and privacy.secure_aggregation off (a reducer must see each member's update)"
            )
        if self.averaging.schedule == "ring" and (
            self.averaging.aggregation != "mean" or self.privacy.secure_aggregation
        ):
            raise ValueError(
                "averaging.schedule 'ring' needs averaging.aggregation mean and privacy.secure_aggregation off "
                "(members see running means, not each other's updates)"
            )
        adaptive = self.training.global_batch_size is not None or self.averaging.adaptive_inner_steps
        if adaptive and self.privacy.dp:
            raise ValueError(
                "privacy.dp needs a fixed batch (its accountant composes one sample rate): leave "
                "training.global_batch_size unset and averaging.adaptive_inner_steps off"
            )
        if self.averaging.adaptive_inner_steps and self.averaging.mode != "diloco":
            raise ValueError("averaging.adaptive_inner_steps sizes DiLoCo phases: it needs averaging.mode diloco")
        if self.training.share_by == "time" and self.training.global_batch_size is None:
            raise ValueError("training.share_by 'time' shares training.global_batch_size: set it too")
        if self.training.global_batch_size is not None and self.averaging.mode not in ("sync", "hierarchical"):
            raise ValueError(
                "training.global_batch_size sizes sync steps; in averaging.mode diloco use "
                "averaging.adaptive_inner_steps instead"
            )
        if self.averaging.mode == "gossip" and self.compression.sparse:
            raise ValueError(
                f"compression.name {self.compression.name!r} keeps a small part of an update, and gossip averages "
                "parameters: use none, fp16 or uint8 with averaging.mode gossip"
            )
        return self

    def group_size(self, ready_peers: int, *, formed: bool = False, hungry: int = 0) -> int:
        """How many peers a round waits for: every ready peer, capped by averaging.target_group_size. Until the swarm
        has formed (swarm.min_peers peers seen ready at once) at least swarm.min_peers, so the first rounds wait
        averaging.matchmaking_time for peers still starting; after that the live count rules, so a peer that died
        costs no wait. Gossip: averaging.gossip_group_size, and one more for each `hungry` peer (one whose last
        round found no partner), so that peers in step with each other stop pairing among themselves while one out
        of step starves."""
        if self.averaging.mode == "gossip":
            size = self.averaging.gossip_group_size
            return min(size + hungry, max(ready_peers, size))
        floor = self.averaging.min_group_size if formed else max(self.swarm.min_peers, self.averaging.min_group_size)
        size = max(ready_peers, floor)
        cap = self.averaging.target_group_size
        return min(size, cap) if cap is not None else size


class Profile(_Section):
    """What one kind of machine brings to the swarm."""

    name: str = "local-cpu"
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where torch compute runs")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice")
    memory_cap_gb: float | None = Field(None, gt=0.0, description="memory this peer may use")
    cloud: str = Field("local", min_length=1, description="cloud or site label, e.g. aws, gcp, onprem")
    region: str = Field("", description="region label, e.g. us-east-1")
    slowdown: float = Field(1.0, ge=1.0, description="emulate slower hardware: sleep (slowdown-1)x compute time")
    client_mode: bool = Field(False, description="dial out only; for peers that cannot accept connections")
    relay: bool = Field(
        False,
        description="cannot accept connections, yet a full member: a bootstrap peer (--initial-peers) relays the "
        "other members' streams to it",
    )

    @model_validator(mode="after")
    def _one_reachability(self) -> Profile:
        if self.client_mode and self.relay:
            raise ValueError("profile: client_mode and relay exclude each other (a relayed peer reduces, a client not)")
        return self


def check_initial_peers(maddrs: Sequence[str]) -> None:
    """ConfigError unless every --initial-peers value is a full multiaddr with a peer id (cheap: checked before a
    command imports its heavy parts)."""
    for maddr in maddrs:
        if not maddr.startswith("/") or "/p2p/" not in maddr:
            raise ConfigError(
                f"--initial-peers {maddr!r} is not a full multiaddr with a peer id "
                "(expected /ip4/HOST/tcp/PORT/p2p/PEER_ID, as printed on a peer's 'bootstrap:' line)"
            )


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key {key!r}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return f"{where}: {msg}"
    return f"{where}: {key}: {msg}, got {first.get('input')!r}"


def _read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {str(path)!r} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parents[: i + 1])} is not a section")
            node = child
        node[leaf] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a run config, apply --set overrides and validate; raises ConfigError with one sentence."""
    data = _read_yaml(path, "config") if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, f"config {str(path) if path else '(defaults)'}")) from None


def load_profile(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    """Read a peer profile (or the defaults) and validate it; raises ConfigError with one sentence."""
    data = _read_yaml(path, "profile") if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, f"profile {str(path) if path else '(defaults)'}")) from None
