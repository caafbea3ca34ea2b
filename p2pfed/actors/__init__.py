"""A peer's actors, each on the peer's asyncio loop.

base.py       Actor (mailbox, tell/ask with deadline) and Supervisor (start in order, stop in reverse)
messages.py   the frozen message types they exchange
discovery.py  Discovery: the hivemind DHT, peer records, live-peer listing
trainer.py    Trainer: model, optimizer, data shard; torch compute in a worker thread
averager.py   Averager: group formation and all-reduce over libp2p, strict commit rule
monitor.py    Monitor: progress and events to the CLI's sink

Import each from its module: `p2pfed status` needs only discovery.py, not the model stack behind trainer.py.
"""
