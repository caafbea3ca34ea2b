"""Actors on one asyncio loop: a mailbox, `tell` for fire-and-forget, `ask` for a reply with a deadline.

Each actor handles one message at a time, in arrival order, with the method named `on_<MessageClass>`. A handler's
exception goes back to whoever asked; for a `tell` it is logged (that is a bug). Asks still queued when the actor stops
fail with ActorDeadError. The Supervisor starts actors in order and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from p2pfed.errors import ActorDeadError

__all__ = ["Actor", "Supervisor"]

logger = logging.getLogger(__name__)

_STOP = object()


class Actor:
    """Base class: subclasses define `on_<MessageClass>(self, msg)` coroutines and optional start/stop hooks."""

    name: str = "actor"

    def __init__(self) -> None:
        self._mailbox: asyncio.Queue[tuple[Any, asyncio.Future[Any] | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive

    async def on_start(self) -> None:
        """Acquire resources; runs before the first message is handled."""

    async def on_stop(self) -> None:
        """Release resources; runs after the last message is handled."""

    def interrupt(self) -> None:
        """Called first thing in stop(): cut short the message in hand, if it can wait on the network for long."""

    async def start(self) -> None:
        await self.on_start()
        self._alive = True
        self._task = asyncio.create_task(self._serve(), name=f"actor-{self.name}")

    def tell(self, msg: Any) -> None:
        """Queue a message that needs no reply."""
        if not self._alive:
            raise ActorDeadError(f"{self.name} is not running; cannot deliver {type(msg).__name__}")
        self._mailbox.put_nowait((msg, None))

    async def ask(self, msg: Any, *, timeout: float) -> Any:
        """Queue a message and wait at most `timeout` seconds for the reply; raises TimeoutError past it."""
        if not self._alive:
            raise ActorDeadError(f"{self.name} is not running; cannot deliver {type(msg).__name__}")
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait((msg, reply))
        try:
            return await asyncio.wait_for(asyncio.shield(reply), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name} did not answer {type(msg).__name__} within {timeout:.1f}s") from None

    async def _serve(self) -> None:
        while True:
            msg, reply = await self._mailbox.get()
            if msg is _STOP:
                break
            handler = getattr(self, f"on_{type(msg).__name__}", None)
            try:
                if handler is None:
                    raise TypeError(f"{self.name} has no handler for {type(msg).__name__}")
                result = await handler(msg)
            except asyncio.CancelledError:
                if reply is not None and not reply.done():
                    reply.set_exception(ActorDeadError(f"{self.name} stopped while handling {type(msg).__name__}"))
                raise
            except Exception as e:
                if reply is not None:
                    if not reply.done():
                        reply.set_exception(e)
                else:
                    logger.exception("%s failed on %s", self.name, type(msg).__name__)
            else:
                if reply is not None and not reply.done():
                    reply.set_result(result)

    async def stop(self, *, timeout: float = 30.0) -> None:
        """Fail queued asks, finish the message in hand (at most `timeout` s), then run on_stop."""
        if not self._alive:
            return
        self._alive = False
        self.interrupt()
        self._fail_queued()
        self._mailbox.put_nowait((_STOP, None))
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                logger.warning("%s did not finish its current message within %.0fs; cancelled it", self.name, timeout)
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=5)
        self._fail_queued()
        await self.on_stop()

    def _fail_queued(self) -> None:
        while not self._mailbox.empty():
            msg, reply = self._mailbox.get_nowait()
            if msg is _STOP:
                continue
            if reply is not None and not reply.done():
                reply.set_exception(ActorDeadError(f"{self.name} stopped before handling {type(msg).__name__}"))


class Supervisor:
    """Starts actors in order, stops them in reverse; SIGINT/SIGTERM set `stop_requested`."""

    def __init__(self, actors: list[Actor]) -> None:
        self.actors = actors
        self.stop_requested = asyncio.Event()
        self._started: list[Actor] = []

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop_requested.is_set():
            logger.warning("second %s: stopping now", signal.Signals(sig).name)
            raise SystemExit(130)
        logger.info("%s received: finishing the current step, then stopping", signal.Signals(sig).name)
        self.stop_requested.set()

    async def start(self) -> None:
        for actor in self.actors:
            await self.start_one(actor)

    async def start_one(self, actor: Actor) -> None:
        """Start an actor that could only be built once earlier ones were up; it stops before them."""
        if actor not in self.actors:
            self.actors.append(actor)
        await actor.start()
        self._started.append(actor)

    async def stop(self) -> None:
        for actor in reversed(self._started):
            try:
                await actor.stop()
            except Exception:
                logger.exception("stopping %s failed", actor.name)
        self._started.clear()
