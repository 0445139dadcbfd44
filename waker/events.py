"""Events: every transition and decision, kept in a ring and fanned out to subscribers."""

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("sparkgate.events")


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    model: str
    kind: str  # "transition" or a decision name such as "idle_stop"; the gateway adds "task_routed", "task_refused"
    source: str = ""
    target: str = ""
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FellBehind(Exception):
    """A subscriber left more than its `backlog` of events unread: it was dropped, and its events end here."""

    def __init__(self, backlog: int) -> None:
        super().__init__(f"more than {backlog} events waited unread: this subscription was dropped")
        self.backlog = backlog


class EventLog:
    """Recent events in memory; subscribers get every new one in order."""

    def __init__(self, keep: int = 1000) -> None:
        self._recent: deque[Event] = deque(maxlen=keep)
        # Each subscriber's queue, and how many unread events it may hold (None: no bound).
        self._subscribers: dict[asyncio.Queue[Event | None], int | None] = {}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def emit(self, event: Event) -> None:
        self._recent.append(event)
        # One line per event, without prompts or keys: only names, states and numbers.
        log.info("%s", json.dumps(event.as_dict(), separators=(",", ":"), default=str))
        for queue, backlog in list(self._subscribers.items()):
            if backlog is not None and queue.qsize() >= backlog:
                self._drop(queue)
            else:
                queue.put_nowait(event)

    def _drop(self, queue: "asyncio.Queue[Event | None]") -> None:
        """End a subscription that fell behind: its unread events are let go at once, and the end marker (None)
        is all it reads next."""
        del self._subscribers[queue]
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)

    def recent(self, model: str | None = None) -> list[Event]:
        return [e for e in self._recent if model is None or e.model == model]

    async def subscribe(self, backlog: int | None = None) -> AsyncIterator[Event]:
        """Every event emitted from the first step of the iteration on, in order.

        `backlog` bounds the events that may wait unread. A subscriber that lets more pile up (an HTTP client that
        stopped reading: its writes wait on a full socket) is dropped, not kept up with by dropping events: its
        unread events are let go at once and the iteration raises FellBehind once it reads again. A gap would leave
        its picture of the models silently wrong; an end tells it to reconnect and read the state anew (the status
        page does, with the last events replayed). None, the default, is for subscribers in this process that await
        nothing but the next event (metrics, `wait_for`): they read everything one turn of the loop emitted before
        the next turn, and must not miss any (tests/unit/test_events.py)."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._subscribers[queue] = backlog
        try:
            while (event := await queue.get()) is not None:
                yield event
            assert backlog is not None  # only a bounded subscription is ever ended
            raise FellBehind(backlog)
        finally:
            self._subscribers.pop(queue, None)

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float) -> Event:
        """The first event (past or future) matching `predicate`; TimeoutError after `timeout`."""
        for event in self._recent:
            if predicate(event):
                return event
        async with asyncio.timeout(timeout):
            async for event in self.subscribe():
                if predicate(event):
                    return event
        raise AssertionError("unreachable")
