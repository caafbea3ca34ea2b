"""One peer: wires the actors together and runs the round loop.

    report = asyncio.run(Peer(cfg, profile, options).run())

Each round: the Trainer computes a gradient on its shard, the Averager all-reduces it with the group (weighted by
samples), and only a committed round reaches the optimizer. A peer that finds itself behind the swarm (it missed a
round, or joined late) downloads model and optimizer state from the most advanced peer.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from hivemind.utils import get_dht_time
from safetensors.torch import save_file

from p2pfed.actors.averager import Averager
from p2pfed.actors.base import Supervisor
from p2pfed.actors.discovery import Discovery
from p2pfed.actors.messages import (
    Announce,
    ApplyOuter,
    ApplyUpdate,
    ComputeGradients,
    DiscardInner,
    DownloadState,
    Evaluate,
    Event,
    GetPeers,
    LoadState,
    PeerRecord,
    Perturb,
    Progress,
    RestoreCheckpoint,
    RoundResult,
    RunInnerSteps,
    RunRound,
    SetGroupSize,
    Snapshot,
    TakeCheckpoint,
)
from p2pfed.actors.monitor import Monitor, Sink
from p2pfed.actors.trainer import Trainer
from p2pfed.admission import Admission
from p2pfed.batching import BatchController, aligned_budget
from p2pfed.checkpoint import check_resume_dir, load_latest, save_checkpoint
from p2pfed.config import Config, Profile
from p2pfed.data import load_corpus
from p2pfed.errors import ActorDeadError, UserError
from p2pfed.gossip import GossipRounds
from p2pfed.log import PeerContext
from p2pfed.overlap import OverlappedRounds
from p2pfed.phases import run_round
from p2pfed.ranks import STOP, RankGroup
from p2pfed.report import dump_round

__all__ = ["Peer", "PeerOptions"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DUMP_ROUNDS = 3  # --dump-grads keeps the first few committed rounds only


@dataclass(kw_only=True, slots=True)
class PeerOptions:
    initial_peers: list[str] = field(default_factory=list)
    identity_path: str | None = None
    report_path: str | None = None
    save_params: str | None = None
    dump_grads: str | None = None
    perturb_at: int | None = None  # test aid: corrupt this peer's parameters after it commits this step
    fault_update: str | None = None  # test aid: send NaN / inf / 1e30 updates ("mixed": each in turn)
    die_in_round: int | None = None  # test aid: SIGKILL this peer's process group in the middle of its Nth round
    resume: str | None = None  # a checkpoint directory to continue from
    announce: list[str] = field(default_factory=list)  # multiaddrs other peers should dial (public address, NAT)
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: any free one)
    metrics_host: str = "127.0.0.1"
    ranks: RankGroup | None = None  # torchrun: this process is rank 0 of a peer that spans several processes
    sink: Sink | None = None
    context: PeerContext = field(default_factory=PeerContext)


class Peer:
    def __init__(self, cfg: Config, profile: Profile, options: PeerOptions) -> None:
        self.cfg, self.profile, self.opt = cfg, profile, options
        self.max_steps = cfg.training.max_steps  # the run's last step (--max-steps lands here), for the lr schedule too
        self.ctx = options.context
        self.samples_per_s = 0.0
        self._last_loss: float | None = None
        self.start_step: int | None = None
        # (when last read, unfinished peers, ready peers), see _swarm_size
        self._swarm_checked: tuple[float, int, int] = (0.0, cfg.swarm.min_peers, cfg.swarm.min_peers)
        self._swarm_refresh: asyncio.Future[None] | None = None
        self._suspects: dict[str, float] = {}  # peer id -> its announcement time when it failed to deliver
        self._formed = False  # swarm.min_peers peers have been ready at once: from then on the live count rules
        self._group_size = cfg.group_size(cfg.swarm.min_peers)  # what the averager was last told
        self._late_s = 0.0  # DiLoCo: how late the next phase starts behind the swarm's (after a missed round)
        self._ready_ids: dict[str, float] = {}  # ready (or joining) peers of the last swarm read -> announce time
        self._joining_ids: set[str] = set()  # peers downloading the swarm's state to join: rounds wait for them
        self._rates: dict[str, float] = {}  # ready peers of the last swarm read -> their samples/s
        self._round_rates: dict[str, float] = {}  # members of the last round -> the samples/s they gathered in it
        self._round_start: tuple[float, float] | None = None  # that round's (started_at, lag), as every member has it
        self._paused_s = 0.0  # time spent evaluating since the last round (not part of a lag)
        self.batching = BatchController(cfg, profile)
        self.stats: dict[str, Any] = {
            "rounds_ok": 0,
            "rounds_failed": 0,
            "rounds_solo": 0,
            "rounds_reformed": 0,  # failed when members vanished mid-round, then committed by those left
            "rounds_retried": 0,  # failed when a member never started it, then committed when run again
            "state_downloads": 0,
            "diverged": 0,  # rounds whose group found this peer's parameters out of line with its majority
            "compute_s": 0.0,
            "failures": collections.Counter(),
            "bytes_by_cloud": collections.Counter(),
            "gossip_missed": 0,
            "dropped": 0,
            "checkpoints": 0,
            "waiting_s": 0.0,
            "work": [],  # samples computed per round
        }
        self._last_save = time.monotonic()
        self._saving: asyncio.Future[None] | None = None

    # --- helpers -------------------------------------------------------------------------------------------------

    async def _until_stop(self, aw: Awaitable[T]) -> T | None:
        """Await `aw` unless a stop is requested first (then cancel it and return None)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.sup.stop_requested.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stop.cancel()
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return None

    def _record(self, *, loss: float | None, finished: bool = False, joining: bool = False) -> PeerRecord:
        ready = getattr(self, "start_step", None) is not None and not finished
        return PeerRecord(
            peer_id=self.peer_id,
            cloud=self.profile.cloud,
            device=str(self.trainer.device) if hasattr(self, "trainer") else self.profile.device,
            step=self.trainer.step if hasattr(self, "trainer") else 0,
            loss=loss,
            samples_per_s=round(self.samples_per_s, 2),
            ready=ready,
            finished=finished,
            joining=joining,
            epsilon=self.trainer.privacy.epsilon()
            if hasattr(self, "trainer") and self.trainer.privacy is not None
            else None,
            bytes_sent=self.averager.bytes_sent if hasattr(self, "averager") else 0,
            gossip_misses=self.gossip.misses if hasattr(self, "gossip") else 0,
        )

    async def _swarm_size(self) -> tuple[int, int]:
        """(unfinished peers, peers ready to average) of the run, this one included, as last read from the DHT. A
        read older than the announce period starts a new one in the background, so the round loop never waits on
        the DHT (only the very first read is awaited). The averager's group size follows the ready count of peers
        not suspected of being gone, so a round starts as soon as every ready peer has joined it; a peer averages
        with nobody only when no other unfinished peer has a live record, suspected or not."""
        stale = time.monotonic() - self._swarm_checked[0] > self.cfg.swarm.announce_every
        if stale and (self._swarm_refresh is None or self._swarm_refresh.done()):
            self._swarm_refresh = asyncio.ensure_future(self._refresh_swarm())
            if self._swarm_checked[0] == 0.0:
                await self._swarm_refresh
        return self._swarm_checked[1], self._swarm_checked[2]

    async def _refresh_swarm(self, others: list[PeerRecord] | None = None) -> None:
        """Re-read the swarm (or use `others`, just read) and set the averager's group size from the ready peers that
        are not suspected of being gone."""
        try:
            others = [p for p in (others if others is not None else await self._others()) if not p.finished]
        except (TimeoutError, ActorDeadError) as e:
            logger.debug("swarm view not refreshed: %r", e)
            return
        for p in others:  # a suspect that announced itself again is back
            if p.peer_id in self._suspects and not self._vanished(p):
                del self._suspects[p.peer_id]
        live = [p for p in others if not self._vanished(p)]
        self._joining_ids = {p.peer_id for p in live if p.joining}
        self._ready_ids = {p.peer_id: p.announced_at for p in live if p.ready or p.joining}
        self._rates = {p.peer_id: p.samples_per_s for p in live if p.ready}
        ready = 1 + len(self._ready_ids)
        self._formed = self._formed or ready >= self.cfg.swarm.min_peers
        hungry = sum(1 for p in live if p.gossip_misses > 0) + (hasattr(self, "gossip") and self.gossip.misses > 0)
        size = self.cfg.group_size(ready, formed=self._formed, hungry=hungry)
        if size != self._group_size:
            self.averager.tell(SetGroupSize(size))
            self._group_size = size
        # Suspects count as unfinished: a peer steps alone only once no other unfinished peer has a live record. A
        # member that missed one round (a stall on a loaded machine) is alive and announces itself again; stepping
        # alone meanwhile would take this peer's parameters away from the swarm's. A dead one's record expires.
        self._swarm_checked = (time.monotonic(), 1 + len(others), ready)

    def _reread_swarm(self) -> None:
        """The next _swarm_size waits for a fresh read of the swarm instead of returning the last one."""
        self._swarm_checked = (0.0, *self._swarm_checked[1:])

    def _vanished(self, peer: PeerRecord) -> bool:
        """A suspect (its part never came, or it did not join) that has not announced itself since."""
        return peer.peer_id in self._suspects and peer.announced_at <= self._suspects[peer.peer_id]

    def _no_shows(self, rnd: RoundResult) -> None:
        """A group smaller than the size asked for formed after averaging.matchmaking_time: the ready peers that did
        not join are suspects until they announce themselves again (alive ones do so within swarm.announce_every)."""
        if self.cfg.averaging.mode == "gossip" or not rnd.members or rnd.group_size >= self._group_size:
            return
        # a joining peer is away while it downloads the state: it is waited for, not suspected
        missing = [peer for peer in self._ready_ids if peer not in rnd.members and peer not in self._joining_ids]
        for peer in missing:
            self._suspects[peer] = self._ready_ids[peer]
            logger.info("ready peer %s did not join the round: not waited for until it announces itself", peer)
        if missing:
            self._reread_swarm()

    async def _leave_out_vanished(self, rnd: RoundResult) -> None:
        """Before a round is re-formed: its vanished members leave the group size, so it starts once those left
        have joined."""
        await self._suspect(rnd.unreachable, await self._others())

    async def _suspect(self, peers: Sequence[str], others: list[PeerRecord]) -> None:
        """Members whose part never came: leave them out of the group size until they announce themselves again (a
        dead peer's record would otherwise hold every round for averaging.matchmaking_time until it expires). Their
        own announcement times are compared, so clocks need not agree across machines."""
        seen = {p.peer_id: p.announced_at for p in others}
        for peer in peers:
            if peer in seen:
                self._suspects[peer] = seen[peer]
                logger.info("member %s did not deliver: left out of the next rounds until it announces itself", peer)
        await self._refresh_swarm(others)

    async def _others(self) -> list[PeerRecord]:
        peers = await self.discovery.ask(GetPeers(), timeout=self.cfg.averaging.request_timeout * 4)
        return [p for p in peers if p.peer_id != self.peer_id]

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        cfg = self.cfg
        self.admission = Admission.from_config(cfg.privacy)  # a bad key file stops here, in one line
        self.monitor = Monitor(self.opt.sink)
        self.discovery = Discovery(
            run_id=cfg.run.id,
            listen=cfg.swarm.listen,
            initial_peers=self.opt.initial_peers,
            client_mode=self.profile.client_mode or self.profile.relay,  # a relayed peer only dials out
            identity_path=self.opt.identity_path,
            announce_maddrs=self.opt.announce,
            record_ttl=cfg.swarm.record_ttl,
            announce_every=cfg.swarm.announce_every,
            run_info={"min_peers": cfg.swarm.min_peers, "mode": cfg.averaging.mode},
            record_validators=[v for v in [self.admission.dht_validator() if self.admission else None] if v],
            bootstrap_retry_s=cfg.swarm.bootstrap_retry_s,
        )
        self.sup = Supervisor([self.monitor, self.discovery])
        try:
            await self.sup.start()
            self.peer_id = self.discovery.peer_id
            self.ctx.peer = self.peer_id[-6:]
            # listening on every interface (/ip4/0.0.0.0/...): show an address another machine can dial first
            maddrs = sorted(self.discovery.visible_maddrs(), key=lambda m: m.startswith(("/ip4/127.", "/ip6/::1/")))
            self.monitor.tell(
                Event("bootstrap", f"bootstrap: {maddrs[0]}", {"maddrs": maddrs, "peer_id": self.peer_id})
            )
            if self.opt.metrics_port is not None:
                self._serve_metrics(self.opt.metrics_port, self.opt.metrics_host)

            corpus = await asyncio.to_thread(load_corpus, cfg.data, cfg.model, seed=cfg.run.seed)
            count = cfg.data.num_partitions or cfg.swarm.min_peers
            index = cfg.data.partition_index
            if index is None:
                index = int(hashlib.sha256(self.peer_id.encode()).hexdigest(), 16) % count
            d = cfg.data
            rows = corpus.partition_rows(index=index, count=count, partitioner=d.partitioner, alpha=d.dirichlet_alpha)
            shard = corpus.train[rows]
            ranks = self.opt.ranks
            if ranks is not None:  # torchrun: the other ranks build the same shard and take their slices of it
                ranks.lead("init", [index, count])
                shard = shard[ranks.rank :: ranks.world]
            self.data_info = {
                "digest": corpus.digest,
                "partitioner": d.partitioner,
                "partition_index": index,
                "num_partitions": count,
                "val_sequences": len(corpus.val),
                **corpus.shard_stats(rows),
            }
            self.trainer = Trainer(cfg, self.profile, corpus, shard, shard_index=index)
            self.trainer.ranks = ranks
            await self.sup.start_one(self.trainer)
            if self.opt.resume is not None:
                await self._resume(Path(self.opt.resume))
            self.averager = Averager(
                cfg,
                dht=self.discovery.dht,
                numel=self.trainer.numel,
                shapes=[tuple(p.shape) for p in self.trainer.params],
                state_fn=self.trainer.current_state,
                client_mode=self.profile.client_mode,
                relays=self.opt.initial_peers if self.profile.relay else (),
                cloud=self.profile.cloud,
                admission=self.admission,
                die_in_round=self.opt.die_in_round,
            )
            await self.sup.start_one(self.averager)
            self.overlap = OverlappedRounds(
                cfg, trainer=self.trainer, averager=self.averager, until_stop=self._until_stop
            )
            self.gossip = GossipRounds(cfg, trainer=self.trainer, averager=self.averager, until_stop=self._until_stop)
            self.sup.install_signal_handlers()
            self.discovery.tell(Announce(self._record(loss=None)))
            report = await self._train(t_start)
        finally:
            await self.sup.stop()
            if self.opt.ranks is not None:
                self.opt.ranks.lead(STOP)
                self.opt.ranks.close()
        return report

    def _compute_budget(self, rates: dict[str, float]) -> tuple[float | None, float]:
        """training.share_by time: (seconds of compute for this step, this peer's lag). While the group stays, every
        member ends its compute at one moment, the same on every member: the last round's start, plus the mean lag
        gathered in it, plus the step's budget. A peer whose round ended, or whose bookkeeping ran, later than the
        others' computes a little less instead of arriving late, and the average peer computes the budget, so the
        step's batch stays about training.global_batch_size (batching.aligned_budget). An evaluation since the round
        moves the moment by its length (every peer evaluates at the same step) and does not count as lag. The lag,
        from the last round's start to this compute, goes into the next round's gather."""
        budget = self.batching.budget(rates, self.peer_id, peers=self._group_size)
        paused, self._paused_s = self._paused_s, 0.0
        if budget is None or self._round_start is None or set(rates) != set(self._round_rates):
            return budget, 0.0
        started, lag = self._round_start
        now = get_dht_time() - paused  # an evaluation since the round moves this peer's moment by its length
        return aligned_budget(budget, started=started, lag=lag, now=now), now - started

    def _share_rates(self) -> dict[str, float]:
        """Samples/s of the peers this step's work is shared among. The members of the last round gathered theirs
        in it, so while the group stays the same every member sizes its share from the same table and the shares
        add up to the global batch. Otherwise (a peer joined or left): the rates the peers published in the DHT, this
        peer's own as the others read it (its live figure leads the published one while rates climb: with it, the
        shares' sum ran up to 24% over the global batch)."""
        ready = {self.peer_id, *self._rates}
        if self._round_rates and set(self._round_rates) == ready:
            return dict(self._round_rates)
        published = self.discovery.published
        own = published.samples_per_s if published is not None and published.samples_per_s > 0 else self.samples_per_s
        return {**self._rates, self.peer_id: own}

    def _serve_metrics(self, port: int, host: str) -> None:
        from p2pfed.metrics import PeerMetrics

        metrics = PeerMetrics(peer_id=self.peer_id, cloud=self.profile.cloud, run_id=self.cfg.run.id)
        try:
            port = metrics.serve(port=port, host=host)
        except OSError as e:
            raise UserError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.monitor.metrics = metrics
        url = f"http://{host}:{port}/metrics"
        self.monitor.tell(Event("metrics", f"metrics: {url}", {"url": url, "port": port}))

    async def _wait_for_swarm(self, *, ready: bool = False) -> bool:
        """Wait until swarm.min_peers peers (this one included) have joined, or with `ready`, are ready to train;
        False if a stop was requested meanwhile."""
        need, deadline = self.cfg.swarm.min_peers, time.monotonic() + self.cfg.swarm.join_timeout
        verb = "be ready" if ready else "join"
        announced = False
        while True:
            others = [p for p in await self._others() if not p.finished and (p.ready or not ready)]
            if len(others) + 1 >= need:
                return True
            if not announced:
                self.monitor.tell(Event("waiting", f"waiting for {need - 1 - len(others)} more peer(s) to {verb}"))
                announced = True
            if time.monotonic() > deadline:
                raise UserError(
                    f"only {len(others) + 1} of swarm.min_peers={need} peers {'were ready' if ready else 'joined'} "
                    f"within {self.cfg.swarm.join_timeout:.0f}s"
                )
            if await self._until_stop(asyncio.sleep(0.5, result=True)) is None:
                return False

    async def _catch_up(self, target_step: int) -> bool:
        """Download state from the most advanced peer; True if we are now at or past `target_step`."""
        state = await self.averager.ask(DownloadState(), timeout=self.cfg.averaging.timeout * 3)
        if state is None:
            return False
        metadata, tensors = state
        if int(metadata.get("step", -1)) < self.trainer.step:
            logger.warning(
                "downloaded state is at step %s, behind this peer's %d: not loaded",
                metadata.get("step"),
                self.trainer.step,
            )
            return False
        try:
            await self.trainer.ask(LoadState(metadata, list(tensors)), timeout=self.cfg.averaging.timeout)
        except ValueError as e:  # a bad or truncated download: nothing was loaded, and the caller tries again
            logger.warning("state download refused: %s", e)
            return False
        self.stats["state_downloads"] += 1
        if self.cfg.averaging.mode == "diloco" and not self.cfg.averaging.overlap:
            # the peer it came from is this far into its phase: the next phase here ends with its (see _train)
            self._late_s = max(0.0, float(metadata.get("phase_age_s", 0.0)))
        self.monitor.tell(
            Event("state", f"downloaded swarm state at step {self.trainer.step}", {"step": self.trainer.step})
        )
        self.averager.set_state_priority(self.trainer.step)
        return self.trainer.step >= target_step

    async def _train(self, t_start: float) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        eval_timeout = 600.0
        if not await self._wait_for_swarm():
            return await self._finish(t_start, None, None, None, None)
        others = await self._others()
        ahead = max((p.step for p in others if not p.finished), default=0)
        if ahead > self.trainer.step:
            self.monitor.tell(Event("joining", f"swarm is at step {ahead}: downloading its state"))
            if cfg.averaging.mode in ("sync", "hierarchical"):
                # Say so first and give the others one announce period to see it: their next round then waits for
                # this peer, so the state downloaded is the state of that round (not one the swarm has moved past).
                self.discovery.tell(Announce(self._record(loss=None, joining=True), now=True))
                await self._until_stop(asyncio.sleep(cfg.swarm.announce_every + 0.5))
                ahead = max([ahead] + [p.step for p in await self._others() if not p.finished])
            for _ in range(3):
                if await self._catch_up(ahead):
                    break
        # Gossip has no barrier: two peers that start first would pair among themselves (and may finish a short run)
        # while a third still evaluates. A gossip peer says it is ready after its first evaluation and begins once
        # swarm.min_peers peers are ready, so that their first windows overlap.
        gossip = cfg.averaging.mode == "gossip"
        initial_eval = await self.trainer.ask(Evaluate(), timeout=eval_timeout) if gossip else None
        start_step = self.trainer.step
        self.start_step = start_step
        self.ctx.step = start_step
        self.discovery.tell(Announce(self._record(loss=None)))  # ready: others now wait for this peer
        if not gossip:
            initial_eval = await self.trainer.ask(Evaluate(), timeout=eval_timeout)
        elif not await self._wait_for_swarm(ready=True):
            return await self._finish(t_start, initial_eval, None, None, eval_timeout)
        eval_loss: float | None = initial_eval
        initial_loss = final_loss = None
        dumped = 0
        alone_since: float | None = None
        wait_s: float | None = None  # set after a round in which a member was catching up
        diloco = cfg.averaging.mode == "diloco"
        overlap = diloco and cfg.averaging.overlap

        while not self.sup.stop_requested.is_set():
            step = self.trainer.step
            self.ctx.step = step
            if self.max_steps is not None and step >= self.max_steps:
                break
            rates = self._share_rates()
            if diloco or gossip:  # H local steps (fewer at the end of the run), then one round
                inner = min(cfg.averaging.inner_steps, (self.max_steps or step + cfg.averaging.inner_steps) - step)
                local_steps = min(inner, self.batching.inner_steps(rates, self.peer_id)) if diloco else inner
                cut = int(self._late_s * self.samples_per_s / t.batch_size)  # starting behind the others' phase
                if cut > 0:  # end with theirs, or this phase ends as late as it starts and misses their round
                    local_steps = max(1, local_steps - cut)
                    logger.info("this phase starts %.1fs behind the swarm's: %d local steps", self._late_s, local_steps)
                self._late_s = 0.0
                work: Any = RunInnerSteps(steps=local_steps, first_step=step)  # the swarm's step advances by inner
                lag = 0.0  # time shares are for sync steps only
            else:
                share = self.batching.batch(rates, self.peer_id, peers=self._group_size)
                budget, lag = self._compute_budget(rates)
                rate = rates.get(self.peer_id, 0.0)
                inner, work = 1, ComputeGradients(batch_size=share, budget_s=budget, rate=rate)
            privacy = self.trainer.privacy
            left = privacy.steps_left() if privacy is not None else None
            if privacy is not None and left is not None and left < inner:
                self.stats["stopped"] = "privacy budget exhausted"
                self.monitor.tell(
                    Event(
                        "privacy",
                        f"privacy budget exhausted: epsilon {privacy.epsilon():.3f} after {privacy.steps} private "
                        f"steps, and {inner} more would pass privacy.target_epsilon {cfg.privacy.target_epsilon} "
                        f"(delta {cfg.privacy.delta}); stopping at step {step}",
                    )
                )
                break
            grads = await self._until_stop(self.trainer.ask(work, timeout=eval_timeout))
            if grads is None:
                break
            self.stats["compute_s"] += grads.compute_s
            self.stats["work"].append(grads.samples)
            rate = grads.samples / max(grads.compute_s, 1e-9)
            self.samples_per_s = rate if self.samples_per_s == 0 else 0.8 * self.samples_per_s + 0.2 * rate
            local = grads.flat_grad.clone() if self.opt.dump_grads and dumped < _DUMP_ROUNDS else None
            if self.opt.fault_update is not None:
                _corrupt(grads.flat_grad, self.opt.fault_update, self.stats["rounds_ok"] + self.stats["rounds_failed"])
            unfinished, _ = await self._swarm_size()
            rnd: RoundResult | None
            if overlap:
                rnd = await self.overlap.phase_done(step, inner, grads, alone=unfinished <= 1)
            elif gossip:
                rnd = await self.gossip.phase_done(step, inner, grads, alone=unfinished <= 1)
            elif unfinished <= 1:
                rnd = RoundResult(committed=True, group_size=1)  # nobody to average with: a local step
            else:
                request = RunRound(
                    step=step,
                    flat_grad=grads.flat_grad,
                    weight=grads.samples,
                    fingerprint=self.trainer.fingerprint,
                    wait_s=cfg.averaging.catchup_grace if wait_s is None and self._joining_ids else wait_s,
                    rate=self.samples_per_s,
                    lag=lag,
                )
                rnd = await self._until_stop(
                    run_round(cfg, self.averager, request, before_reform=self._leave_out_vanished)
                )
            wait_s = None
            if rnd is None:
                break
            self.stats["rounds_reformed"] += int(rnd.committed and rnd.reformed)
            self.stats["rounds_retried"] += int(rnd.committed and rnd.retried)
            self.stats["bytes_by_cloud"].update(rnd.bytes_by_cloud)
            self.stats["waiting_s"] += rnd.waited_s
            self._no_shows(rnd)
            self.stats["dropped"] += rnd.dropped
            # the next step's shares come from this round's table while the group stays (sync rounds gather rates)
            gathered = rnd.committed and len(rnd.rates) > 1 and all(r > 0 for r in rnd.rates.values())
            self._round_rates = dict(rnd.rates) if gathered else {}
            self._round_start = (rnd.started_at, rnd.lag) if gathered else None
            if gossip and not rnd.committed:  # no partner this time, or a group that fell apart: train on
                self.stats["gossip_missed"] += 1
                self._reread_swarm()  # the others may have finished
            elif rnd.committed and (overlap or gossip):  # already applied (overlap: rnd is the previous round)
                self.stats["rounds_ok" if rnd.group_size > 1 else "rounds_solo"] += rnd.group_size > 0
                initial_loss = grads.loss if initial_loss is None else initial_loss
                final_loss = grads.loss
            elif rnd.committed:
                if local is not None:
                    dump_round(self.opt.dump_grads, self.peer_id, step, grads.samples, local, grads.flat_grad)
                    dumped += 1
                if diloco:
                    apply: Any = ApplyOuter(step, inner, grads.flat_grad, samples=grads.samples)
                else:
                    apply = ApplyUpdate(step, samples=grads.samples)
                await self.trainer.ask(apply, timeout=eval_timeout)
                if self.opt.perturb_at == step:
                    await self.trainer.ask(Perturb(), timeout=eval_timeout)
                    logger.warning("fault injection: parameters perturbed after step %d", step)
                self.stats["rounds_ok" if rnd.group_size > 1 else "rounds_solo"] += 1
                self.averager.set_state_priority(self.trainer.step)
                initial_loss = grads.loss if initial_loss is None else initial_loss
                final_loss = grads.loss
                alone_since = None
            else:
                self.stats["rounds_failed"] += 1
                if diloco and not overlap:
                    await self.trainer.ask(DiscardInner(), timeout=eval_timeout)
                self.stats["failures"][rnd.reason.split(":")[0]] += 1
                logger.warning("round failed (%s); step skipped", rnd.reason)
                everyone = await self._others()
                await self._suspect(rnd.unreachable, everyone)
                others = [p for p in everyone if not p.finished]
                # finished peers count too: one that committed the last round without us lingers to share its state
                ahead = max([p.step for p in everyone] + [rnd.max_group_step])
                if rnd.diverged:  # this peer applied an update the others did not: take the majority's state
                    self.stats["diverged"] += 1
                    self.averager.set_state_priority(self.trainer.step - 0.5)  # nobody should copy us meanwhile
                    await self.overlap.drop()
                    await self._catch_up(self.trainer.step)
                elif ahead > self.trainer.step:
                    await self.overlap.drop()
                    await self._catch_up(ahead)
                elif 0 <= rnd.min_group_step < self.trainer.step:
                    wait_s = cfg.averaging.catchup_grace  # hold the next group open while the laggard catches up
                if not others:
                    alone_since = alone_since or time.monotonic()
                    if time.monotonic() - alone_since > cfg.swarm.join_timeout:
                        raise UserError(
                            f"no other live peer for {cfg.swarm.join_timeout:.0f}s; "
                            f"stopping at step {self.trainer.step}"
                        )
                    finished = [p for p in everyone if p.finished]
                    if finished and cfg.averaging.min_group_size > 1:
                        self.monitor.tell(Event("finished", "the rest of the swarm has finished; stopping"))
                        break
            if self.trainer.step // t.eval_every != step // t.eval_every:
                t_eval = time.perf_counter()
                eval_loss = await self.trainer.ask(Evaluate(), timeout=eval_timeout)
                self._paused_s = time.perf_counter() - t_eval
            self._last_loss = final_loss
            self._maybe_checkpoint()
            self.discovery.tell(Announce(self._record(loss=final_loss)))
            self.monitor.tell(
                Progress(
                    step=self.trainer.step,
                    max_steps=self.max_steps,
                    loss=grads.loss,
                    eval_loss=eval_loss,
                    samples_per_s=self.samples_per_s,
                    group_size=rnd.group_size,
                    rounds_ok=self.stats["rounds_ok"],
                    rounds_failed=self.stats["rounds_failed"],
                    epsilon=self.trainer.privacy.epsilon() if self.trainer.privacy is not None else None,
                    waiting_s=round(self.stats["waiting_s"], 4),
                    samples=grads.samples,
                    samples_total=self.trainer.samples_seen,
                    tokens=self.trainer.samples_seen * cfg.model.seq_len,
                    bytes_sent=self.averager.bytes_sent,
                    bytes_received=self.averager.bytes_received,
                    bytes_by_cloud=dict(self.stats["bytes_by_cloud"]),
                )
            )
        if not self.sup.stop_requested.is_set() and not gossip:  # a gossip peer never downloads state: no one waits
            await self._linger()
        if overlap and not self.sup.stop_requested.is_set():
            last = await self.overlap.settle()
            if last is not None:
                self.stats["rounds_ok" if last.group_size > 1 else "rounds_solo"] += int(last.committed)
                self.stats["rounds_failed"] += int(not last.committed)
                self.stats["rounds_reformed"] += int(last.committed and last.reformed)
                self.stats["rounds_retried"] += int(last.committed and last.retried)
        return await self._finish(t_start, initial_eval, initial_loss, final_loss, eval_timeout)

    async def _linger(self) -> None:
        """Before leaving, wait (at most averaging.timeout) while a live peer is behind: if it missed the last round
        that we committed, it can still download our state instead of ending with different parameters."""
        # Publish our final step at once: a peer that missed the last round decides to catch up from it.
        self.discovery.tell(Announce(self._record(loss=self._last_loss), now=True))
        deadline = time.monotonic() + self.cfg.averaging.timeout
        while time.monotonic() < deadline:
            behind = [
                p
                for p in await self._others()
                if not p.finished and p.step < self.trainer.step and not self._vanished(p)
            ]
            if not behind:
                return
            if await self._until_stop(asyncio.sleep(0.5, result=True)) is None:
                return

    # --- checkpoints ----------------------------------------------------------------------------------------------

    @property
    def _checkpoint_dir(self) -> Path | None:
        directory = self.cfg.checkpoint.dir or self.opt.resume  # a resumed peer goes on saving where it resumed from
        return Path(directory) if directory else None

    async def _resume(self, directory: Path) -> None:
        check_resume_dir(directory)
        found = await asyncio.to_thread(load_latest, directory)
        if found is None:
            raise UserError(f"--resume {str(directory)!r} holds no checkpoint (ckpt-*.safetensors)")
        tensors, meta, path = found
        if meta.get("run_id") != self.cfg.run.id:
            raise UserError(f"{path} belongs to run {meta.get('run_id')!r}, not {self.cfg.run.id!r}")
        await self.trainer.ask(RestoreCheckpoint(tensors, meta), timeout=600.0)
        self._last_save = time.monotonic()
        self.monitor.tell(Event("resumed", f"resumed from {path} at step {self.trainer.step}", {"path": str(path)}))

    def _maybe_checkpoint(self) -> None:
        """Start a checkpoint when checkpoint.every_s has passed since the last one and none is being written: the
        trainer copies its state (a short pause), the file is written in a thread while training goes on."""
        if self._checkpoint_dir is None or (self._saving is not None and not self._saving.done()):
            return
        if time.monotonic() - self._last_save < self.cfg.checkpoint.every_s:
            return
        self._last_save = time.monotonic()
        self._saving = asyncio.ensure_future(self._save_checkpoint())

    async def _save_checkpoint(self) -> None:
        directory = self._checkpoint_dir
        assert directory is not None
        try:
            tensors, meta = await self.trainer.ask(TakeCheckpoint(), timeout=600.0)
            path = await asyncio.to_thread(save_checkpoint, directory, tensors, meta, keep=self.cfg.checkpoint.keep)
        except (OSError, TimeoutError, ActorDeadError) as e:
            logger.warning("checkpoint not written: %s", e)
            return
        self.stats["checkpoints"] += 1
        logger.info("checkpoint at step %d: %s", meta["step"], path)

    async def _final_checkpoint(self) -> None:
        if self._checkpoint_dir is None:
            return
        if self._saving is not None:
            await self._saving
        await self._save_checkpoint()

    async def _finish(
        self,
        t_start: float,
        initial_eval: float | None,
        initial_loss: float | None,
        final_loss: float | None,
        eval_timeout: float | None,
    ) -> dict[str, Any]:
        eval_loss = await self.trainer.ask(Evaluate(), timeout=eval_timeout or 600.0)
        self.discovery.tell(Announce(self._record(loss=final_loss, finished=True)))
        await self._final_checkpoint()
        params = await self.trainer.ask(Snapshot(), timeout=600.0)
        if self.opt.save_params:
            Path(self.opt.save_params).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in params.items()}, self.opt.save_params)
        start = self.start_step if self.start_step is not None else self.trainer.step
        report = {
            "peer_id": self.peer_id,
            "steps": self.trainer.step - start,
            "samples": self.trainer.samples_seen,
            "initial_loss": initial_loss,
            "final_loss": final_loss,
            "eval_loss": eval_loss,
            "rounds_ok": self.stats["rounds_ok"],
            "rounds_failed": self.stats["rounds_failed"],
            "rounds_solo": self.stats["rounds_solo"],
            "rounds_reformed": self.stats["rounds_reformed"],
            "rounds_retried": self.stats["rounds_retried"],
            "bytes_sent": self.averager.bytes_sent,
            "bytes_received": self.averager.bytes_received,
            "bytes_forwarded": self.averager.bytes_forwarded,  # relayed between other peers (profile relay)
            "bytes_by_cloud": dict(self.stats["bytes_by_cloud"]),
            "gossip_missed": self.stats["gossip_missed"],
            "contributions_dropped": self.stats["dropped"],
            "checkpoints": self.stats["checkpoints"],
            "gossip_disagreement": [round(d, 6) for d in self.gossip.disagreement],
            "param_l2": self.trainer.param_l2(),
            "initial_eval_loss": initial_eval,
            "start_step": start,
            "final_step": self.trainer.step,
            "state_downloads": self.stats["state_downloads"],
            "diverged": self.stats["diverged"],
            "failure_reasons": dict(self.stats["failures"]),
            "compute_s": round(self.stats["compute_s"], 3),
            "waiting_s": round(self.stats["waiting_s"], 3),
            "slowdown": self.profile.slowdown,
            "samples_per_round": round(statistics.mean(self.stats["work"]), 2) if self.stats["work"] else 0.0,
            "deadlines": {
                "matchmaking_s": round(self.averager.deadlines.matchmaking_s, 3),
                "allreduce_s": round(self.averager.deadlines.allreduce_s, 3),
            },
            "wall_s": round(time.perf_counter() - t_start, 3),
            "samples_per_s": round(self.samples_per_s, 2),
            "cloud": self.profile.cloud,
            "device": str(self.trainer.device),
            "parameters": self.trainer.numel,
            "data": self.data_info,
            "stopped": self.stats.get("stopped", ""),
            "dp": self.trainer.privacy is not None,
        }
        if self.trainer.privacy is not None:  # everything needed to recompute epsilon
            report.update(self.trainer.privacy.report())
        if self.opt.report_path:
            Path(self.opt.report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.opt.report_path).write_text(json.dumps(report, indent=2))
        self.monitor.tell(Event("done", f"finished at step {self.trainer.step}: eval loss {eval_loss:.4f}", report))
        return report


_FAULTS = {"nan": math.nan, "inf": math.inf, "huge": 1e30}


def _corrupt(update: torch.Tensor, kind: str, round_index: int) -> None:
    """Fault injection (--fault-update): overwrite this peer's outgoing update with NaN, inf or 1e30 values (in a
    few places, as an overflow would), or with each of those in turn."""
    if kind == "mixed":
        kind = list(_FAULTS)[round_index % len(_FAULTS)]
    update[:: max(1, update.numel() // 7)] = _FAULTS[kind]
    logger.warning("fault injection: this round's update carries %s values", kind)
