"""A peer's actors, each on the peer's asyncio loop.

base.py       Actor (mailbox, tell/ask with deadline) and Supervisor (start in order, stop in reverse)
messages.py   the frozen message types they exchange
discovery.py  Discovery: the hivemind DHT, peer records, live-peer listing
trainer.py    Trainer: model, optimizer, data shard; torch compute in a worker thread
averager.py   Averager: group formation and all-reduce over libp2p, strict commit rule
monitor.py    Monitor: progress and events to the CLI's sink
"""

from p2pfed.actors.averager import Averager
from p2pfed.actors.base import Actor, Supervisor
from p2pfed.actors.discovery import Discovery
from p2pfed.actors.monitor import Monitor
from p2pfed.actors.trainer import Trainer

__all__ = ["Actor", "Averager", "Discovery", "Monitor", "Supervisor", "Trainer"]
