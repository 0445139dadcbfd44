"""EventLog subscribers (issue 17): a bounded subscriber that stops reading is dropped past its backlog, and told so;
one that reads keeps every event in order; an unbounded one (metrics, `wait_for`) never loses any."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from waker.events import Event, EventLog, FellBehind


def event(n: int) -> Event:
    return Event(float(n), "m", "test", reason=str(n))


async def subscribed(log: EventLog, backlog: int | None) -> tuple["asyncio.Future[Event]", AsyncIterator[Event]]:
    """A subscription, registered (its first step ran) and waiting for its first event."""
    follower = log.subscribe(backlog=backlog)
    first = asyncio.ensure_future(anext(follower))
    before = log.subscribers
    await asyncio.sleep(0)  # one turn of the loop: the iteration's first step registers it
    assert log.subscribers == before + 1
    return first, follower


async def test_a_subscriber_that_never_reads_is_dropped_past_its_backlog_and_told_so() -> None:
    log = EventLog()
    first, _ = await subscribed(log, backlog=5)
    for n in range(1000):  # emitted in one step: the subscriber never gets to read
        log.emit(event(n))
    assert log.subscribers == 0  # dropped at the 6th event: nothing holds the other 994, nor any later one
    with pytest.raises(FellBehind, match="more than 5 events waited unread"):
        await first  # what it reads next: the end, not the 5 stale events


async def test_a_subscriber_that_reads_keeps_every_event_in_order() -> None:
    log = EventLog()
    first, follower = await subscribed(log, backlog=5)
    seen = []
    for batch in range(3):
        for n in range(5):  # up to its backlog per turn
            log.emit(event(batch * 5 + n))
        seen.append(await first if batch == 0 else await anext(follower))
        seen += [await anext(follower) for _ in range(4)]
    assert [e.reason for e in seen] == [str(n) for n in range(15)]
    assert log.subscribers == 1


async def test_an_unbounded_subscriber_gets_everything_one_turn_emits() -> None:
    log = EventLog()
    first, follower = await subscribed(log, backlog=None)
    for n in range(10_000):
        log.emit(event(n))
    seen = [await first] + [await anext(follower) for _ in range(9_999)]
    assert [e.reason for e in seen] == [str(n) for n in range(10_000)]
    found = asyncio.ensure_future(log.wait_for(lambda e: e.reason == "late", timeout=5))
    await asyncio.sleep(0)
    log.emit(Event(0.0, "m", "test", reason="late"))
    assert (await found).reason == "late"
