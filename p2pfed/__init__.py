"""p2pfed: train one causal language model across sites, peer to peer, with no central server.

config.py     typed run config and peer profiles (pydantic; unknown keys rejected)
config_reference.py  the configuration reference (docs/CONFIG.md), generated from config.py
data.py       text sources, byte tokenizer, train/val split and per-peer partitions
partition.py  partitioners (iid, dirichlet over sources, by_file): pure functions of (data, seed, shard)
batching.py   BatchController: each peer's share of a round from its measured speed; micro-batches that fit
checkpoint.py atomic safetensors checkpoints (.partial/, fsync, rename) and finding the newest that reads
lifeline.py   a peer's helper processes exit when its main process dies
robust.py     contribution guards and robust rules (trimmed mean, centered clip)
model.py      transformers causal LMs built from a config (Llama, GPT-2) or a local directory
allreduce.py  SwarmAverager: hivemind's matchmaking and state sharing around p2pfed's own all-reduce
butterfly.py  the all-reduce itself: each member reduces one slice, over libp2p streams or direct TCP; strict
channel.py    the byte streams under it: libp2p streams, or sockets read straight into tensors (recv_into)
pieces.py     a reducer's slice, reduced and answered piece by piece as the members' copies arrive
ring.py       the other schedule (averaging.schedule ring): each member sends only to the next, one flow per link
wire.py       the framing both put on a channel: payloads, statuses
reductions.py how each compressor's round crosses the butterfly (dense, shared coordinates, sparse, low rank)
hierarchy.py  cloud-aware all-reduce: inside each cloud, then one delegate per cloud across clouds, then back
secagg.py     secure aggregation: fixed point in Z_2^b, pairwise X25519/HKDF/ChaCha20 masks that cancel in the sum
admission.py  swarm key: sealed DHT records, membership proofs, allow and revoke lists
privacy.py    DP-SGD on a peer (opacus clipping and noise) and its accountant, with the budget stop
actors/       a peer's actors: Discovery, Trainer, Averager, Monitor and their Supervisor
peer.py       one peer: wires the actors and runs the round loop
ranks.py      a peer over several processes or GPUs (torchrun): rank 0 joins the swarm, the others mirror it
phases.py     PhaseRounds: what a mode without a per-step barrier does after each phase of local steps
overlap.py    DiLoCo with overlap: a phase's all-reduce runs while the next phase trains
gossip.py     gossip: parameter averaging with whichever few peers are ready, no global barrier
compression/  compressors behind a small ABC (none, fp16, uint8, randomk, topk, powersgd), error feedback, ring
swarm.py      a local multi-process swarm (process groups, progress, combined report)
status.py     live peers of a run, read from the DHT (once, or again and again for --watch)
metrics.py    a peer's Prometheus metrics (--metrics-port)
run_report.py `p2pfed report`: plots and a markdown summary of a run directory
cost.py       egress cost per cloud pair, and the sync fp32 baseline's bytes
bench/        benchmarks that print ours / reference ratios
cli.py        the `p2pfed` command
"""

__version__ = "0.1.0"
