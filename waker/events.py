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
    kind: str  # "transition" or a decision name such as "idle_stop"
    source: str = ""
    target: str = ""
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """Recent events in memory; subscribers get every new one in order."""

    def __init__(self, keep: int = 1000) -> None:
        self._recent: deque[Event] = deque(maxlen=keep)
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def emit(self, event: Event) -> None:
        self._recent.append(event)
        # One line per event, without prompts or keys: only names, states and numbers.
        log.info("%s", json.dumps(event.as_dict(), separators=(",", ":"), default=str))
        for queue in self._subscribers:
            queue.put_nowait(event)

    def recent(self, model: str | None = None) -> list[Event]:
        return [e for e in self._recent if model is None or e.model == model]

    async def subscribe(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

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
