"""Actor mailboxes (tell, ask with a deadline, errors back to the asker, stop) and the Supervisor's start/stop order.

.venv/bin/python -m pytest -q tests/test_actors.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from p2pfed.actors.base import Actor, Supervisor
from p2pfed.errors import ActorDeadError

# --- messages and actors used by the tests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Add:
    value: int


@dataclass(frozen=True)
class Record:
    item: int
    delay: float = 0.0


@dataclass(frozen=True)
class Fail:
    message: str


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Unknown:
    pass


class Worker(Actor):
    """Adds numbers; records the order of tells; can fail or sleep on request."""

    name = "counter"

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.seen: list[int] = []
        self.in_handler = 0
        self.max_in_handler = 0

    async def on_Add(self, msg: Add) -> int:
        self.total += msg.value
        return self.total

    async def on_Record(self, msg: Record) -> None:
        self.in_handler += 1
        self.max_in_handler = max(self.max_in_handler, self.in_handler)
        await asyncio.sleep(msg.delay)
        self.seen.append(msg.item)
        self.in_handler -= 1

    async def on_Fail(self, msg: Fail) -> None:
        raise ValueError(msg.message)

    async def on_Sleep(self, msg: Sleep) -> float:
        await asyncio.sleep(msg.seconds)
        return msg.seconds


class Hooked(Actor):
    """Writes its start and stop hooks into a shared journal."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__()
        self.name = name
        self.journal = journal

    async def on_start(self) -> None:
        self.journal.append(f"start {self.name}")

    async def on_stop(self) -> None:
        self.journal.append(f"stop {self.name}")


async def _started(actor: Actor) -> Actor:
    await actor.start()
    return actor


# --- ask and tell ----------------------------------------------------------------------------------------------------


def test_ask_returns_the_handlers_result():
    async def scenario():
        actor = await _started(Worker())
        try:
            return [await actor.ask(Add(v), timeout=1.0) for v in (1, 2, 3)]
        finally:
            await actor.stop()

    # Execute
    results = asyncio.run(scenario())

    # Assert
    assert results == [1, 3, 6]


def test_tells_are_handled_in_arrival_order_one_at_a_time():
    # Prepare: later messages are quicker, so concurrent handling would reorder them
    delays = [0.02, 0.0, 0.01, 0.0, 0.005]

    async def scenario():
        actor = await _started(Worker())
        for i, delay in enumerate(delays):
            actor.tell(Record(i, delay))
        await actor.ask(Add(0), timeout=2.0)  # queued behind the tells: answered once they are all handled
        await actor.stop()
        return actor

    # Execute
    actor = asyncio.run(scenario())

    # Assert
    assert actor.seen == list(range(len(delays)))
    assert actor.max_in_handler == 1


def test_handler_exception_goes_to_the_asker_and_the_actor_keeps_serving():
    async def scenario():
        actor = await _started(Worker())
        try:
            with pytest.raises(ValueError, match="^boom 42$"):
                await actor.ask(Fail("boom 42"), timeout=1.0)
            return actor.alive, await actor.ask(Add(5), timeout=1.0)
        finally:
            await actor.stop()

    # Execute
    alive, after = asyncio.run(scenario())

    # Assert
    assert alive
    assert after == 5


def test_failing_tell_is_logged_and_the_actor_keeps_serving(caplog):
    async def scenario():
        actor = await _started(Worker())
        actor.tell(Fail("tell failed"))
        result = await actor.ask(Add(1), timeout=1.0)
        await actor.stop()
        return result

    # Execute
    with caplog.at_level("ERROR", logger="p2pfed.actors.base"):
        result = asyncio.run(scenario())

    # Assert
    assert result == 1
    assert any("Fail" in r.getMessage() for r in caplog.records)


def test_ask_past_its_timeout_raises_timeout_error():
    async def scenario():
        actor = await _started(Worker())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            with pytest.raises(TimeoutError, match="Sleep"):
                await actor.ask(Sleep(1.0), timeout=0.05)
            return loop.time() - t0
        finally:
            await actor.stop(timeout=0.05)

    # Execute
    waited = asyncio.run(scenario())

    # Assert: the asker got control back at its deadline, not when the handler finished
    assert waited < 0.5


def test_unknown_message_type_gives_type_error_to_the_asker():
    async def scenario():
        actor = await _started(Worker())
        try:
            with pytest.raises(TypeError, match="Unknown"):
                await actor.ask(Unknown(), timeout=1.0)
            return await actor.ask(Add(2), timeout=1.0)
        finally:
            await actor.stop()

    # Execute / Assert
    assert asyncio.run(scenario()) == 2


# --- stop ------------------------------------------------------------------------------------------------------------


def test_ask_and_tell_after_stop_raise_actor_dead_error():
    async def scenario():
        actor = await _started(Worker())
        await actor.stop()
        assert not actor.alive
        with pytest.raises(ActorDeadError):
            await actor.ask(Add(1), timeout=1.0)
        with pytest.raises(ActorDeadError):
            actor.tell(Add(1))
        return actor.total

    # Execute / Assert
    assert asyncio.run(scenario()) == 0


def test_ask_before_start_raises_actor_dead_error():
    async def scenario():
        with pytest.raises(ActorDeadError):
            await Worker().ask(Add(1), timeout=1.0)

    # Execute
    asyncio.run(scenario())


def test_asks_in_hand_and_queued_fail_with_actor_dead_error_when_stop_times_out():
    async def scenario():
        actor = await _started(Worker())
        in_hand = asyncio.create_task(actor.ask(Sleep(5.0), timeout=10.0))
        await asyncio.sleep(0.01)  # the actor is now inside on_Sleep
        queued = [asyncio.create_task(actor.ask(Add(v), timeout=10.0)) for v in (1, 2)]
        await asyncio.sleep(0)
        await actor.stop(timeout=0.05)
        results = await asyncio.gather(in_hand, *queued, return_exceptions=True)
        return actor, results

    # Execute
    actor, results = asyncio.run(scenario())

    # Assert
    assert [type(r) for r in results] == [ActorDeadError] * 3
    assert actor.total == 0  # the queued asks were never handled


def test_queued_asks_fail_at_stop_while_the_message_in_hand_finishes():
    async def scenario():
        actor = await _started(Worker())
        in_hand = asyncio.create_task(actor.ask(Sleep(0.2), timeout=10.0))
        await asyncio.sleep(0.01)  # the actor is now inside on_Sleep
        queued = asyncio.create_task(actor.ask(Add(1), timeout=10.0))
        await asyncio.sleep(0)
        await actor.stop(timeout=5.0)
        return actor, await asyncio.gather(in_hand, queued, return_exceptions=True)

    # Execute
    actor, (finished, queued) = asyncio.run(scenario())

    # Assert
    assert finished == 0.2
    assert isinstance(queued, ActorDeadError)
    assert actor.total == 0


def test_stop_twice_is_harmless():
    async def scenario():
        journal: list[str] = []
        actor = await _started(Hooked("a", journal))
        await actor.stop()
        await actor.stop()
        return journal

    # Execute / Assert
    assert asyncio.run(scenario()) == ["start a", "stop a"]


# --- supervisor ------------------------------------------------------------------------------------------------------


def test_supervisor_starts_in_order_and_stops_in_reverse():
    async def scenario():
        journal: list[str] = []
        actors = [Hooked(n, journal) for n in ("discovery", "trainer", "averager")]
        supervisor = Supervisor(actors)
        await supervisor.start()
        alive_after_start = [a.alive for a in actors]
        await supervisor.stop()
        return journal, alive_after_start, [a.alive for a in actors]

    # Execute
    journal, alive_after_start, alive_after_stop = asyncio.run(scenario())

    # Assert
    assert journal == [
        "start discovery",
        "start trainer",
        "start averager",
        "stop averager",
        "stop trainer",
        "stop discovery",
    ]
    assert alive_after_start == [True, True, True]
    assert alive_after_stop == [False, False, False]


def test_actor_added_with_start_one_is_stopped_first():
    async def scenario():
        journal: list[str] = []
        supervisor = Supervisor([Hooked("a", journal), Hooked("b", journal)])
        await supervisor.start()
        late = Hooked("late", journal)
        await supervisor.start_one(late)
        await supervisor.stop()
        return journal, supervisor.actors, late

    # Execute
    journal, actors, late = asyncio.run(scenario())

    # Assert
    assert journal == ["start a", "start b", "start late", "stop late", "stop b", "stop a"]
    assert actors[-1] is late


def test_supervisor_keeps_stopping_when_one_actor_fails_to_stop():
    class BadStop(Hooked):
        async def on_stop(self) -> None:
            await super().on_stop()
            raise RuntimeError("cannot release")

    async def scenario():
        journal: list[str] = []
        supervisor = Supervisor([Hooked("a", journal), BadStop("bad", journal), Hooked("c", journal)])
        await supervisor.start()
        await supervisor.stop()
        return journal

    # Execute / Assert
    assert asyncio.run(scenario())[-3:] == ["stop c", "stop bad", "stop a"]
