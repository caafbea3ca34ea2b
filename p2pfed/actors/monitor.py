"""Monitor: the only actor that talks to the terminal side. It hands progress and events to a sink that the CLI
chooses (rich lines for a person, JSON lines for `p2pfed swarm`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from p2pfed.actors.base import Actor
from p2pfed.actors.messages import Event, Progress

if TYPE_CHECKING:
    from p2pfed.metrics import PeerMetrics

__all__ = ["Monitor", "Sink"]

logger = logging.getLogger(__name__)

Sink = Callable[[str, dict[str, Any]], None]


class Monitor(Actor):
    name = "monitor"

    def __init__(self, sink: Sink | None) -> None:
        super().__init__()
        self.sink = sink
        self.last_progress: Progress | None = None
        self.metrics: PeerMetrics | None = None  # set when the peer serves Prometheus metrics

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.sink is None:
            return
        try:
            self.sink(kind, data)
        except Exception:  # a broken terminal or pipe must not stop training
            logger.exception("progress sink failed")

    async def on_Progress(self, msg: Progress) -> None:
        self.last_progress = msg
        if self.metrics is not None:
            try:
                self.metrics.update(msg.__dict__)
            except Exception:  # metrics must never stop training
                logger.exception("metrics update failed")
        self._emit("progress", msg.__dict__ | {})

    async def on_Event(self, msg: Event) -> None:
        logger.info("%s", msg.text)
        self._emit(msg.kind, {"text": msg.text, **msg.data})
