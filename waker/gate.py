"""The way requests go into one model: wait until it is ready (joining its start, queueing for room, held back
while it drains), count each request in flight until its answer is sent, and bound them by max_concurrent.

The gate composes the two owners and writes neither: the controller (lifecycle) starts, wakes and reports;
the seat (scheduling) says whether the model may take new work. A request that waited for a model's start or
wake is always served once it is up; only new work is held back from a draining model (else two models could
evict each other's waiters forever: tests/unit/scheduling/test_admission_properties.py with max_hold 0).
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from waker.clock import Clock
from waker.config.spec import ModelSpec
from waker.errors import ModelNotFound, QueueFull, ShuttingDown, StartFailed, Withdrawn
from waker.lifecycle.controller import ModelController
from waker.runtime.base import EngineHandle
from waker.scheduling.cluster import ClusterAdmission
from waker.scheduling.seat import Seat
from waker.state import ModelState

S = ModelState


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a leased model answers."""

    api_base: str  # e.g. http://127.0.0.1:8000/v1
    spec: ModelSpec
    root_url: str  # e.g. http://127.0.0.1:8000: where a service's own routes are (gateway/services.py)


class Limiter:
    """At most `limit` holders at once (None: no limit), the rest waiting in arrival order up to `max_waiting`.

    Resized in place when models.d changes `max_concurrent`: replacing it would let the old and the new limit
    run side by side (tests/unit/test_gate.py::test_a_policy_reload_never_exceeds_max_concurrent).
    """

    def __init__(self, limit: int | None, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, limit: int | None, max_waiting: int) -> None:
        self.limit, self.max_waiting = limit, max_waiting
        self._hand_over()

    def must_wait(self) -> bool:
        """Whether a `slot()` taken now would wait for a place (or be refused: `full()`) rather than enter at once."""
        return self.limit is not None and (self.active >= self.limit or bool(self._waiters))

    def full(self) -> bool:
        """Whether a `slot()` taken now would be refused (QueueFull)."""
        return self.must_wait() and len(self._waiters) >= self.max_waiting

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        if self.must_wait():
            if len(self._waiters) >= self.max_waiting:
                raise QueueFull(
                    f"{model} already runs {self.limit} requests (max_concurrent) and {len(self._waiters)} more "
                    f"wait (max_waiting {self.max_waiting}); try again shortly", model=model)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.active -= 1  # handed a slot just as it was cancelled: give it on
                    self._hand_over()
                elif waiter in self._waiters:  # a hand-over may have dropped it already (it was cancelled)
                    self._waiters.remove(waiter)
                raise
        else:
            self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and (self.limit is None or self.active < self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)


class Gate:
    """Requests into one model (see the module docstring)."""

    def __init__(self, controller: ModelController, scheduler: ClusterAdmission | None, clock: Clock) -> None:
        self.controller = controller
        self._scheduler = scheduler  # None: not managed by the waker (an external endpoint)
        self._clock = clock
        spec = controller.spec
        self.limiter = Limiter(spec.max_concurrent, spec.max_waiting)

    @property
    def spec(self) -> ModelSpec:
        return self.controller.spec

    @property
    def limited(self) -> bool:
        """True when `max_concurrent` bounds the requests at once (take a `slot` first)."""
        return self.limiter.limit is not None

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A place among the model's `max_concurrent` requests: wait for one, or QueueFull beyond `max_waiting`."""
        return self.limiter.slot(self.controller.name)

    def ready_now(self) -> bool:
        return self.controller.state is S.READY

    async def acquire(self) -> Endpoint:
        """A ready endpoint, counted as in flight until `release()`; starts the engine if needed. The model is
        never stopped while acquired or while an acquire waits."""
        controller = self.controller
        if not self._held_back():
            handle = controller.take()
            if handle is not None:
                return Endpoint(handle.api_base, controller.spec, handle.root_url)
        with controller.waiting_for_it():
            await self.ensure_ready()
            # No await between the READY check in ensure_ready and this count: no stop can slip in between.
            handle = controller.take()
        assert handle is not None
        return Endpoint(handle.api_base, controller.spec, handle.root_url)

    def release(self) -> None:
        self.controller.release()

    async def warm(self) -> None:
        """Bring the model up (through admission, like a request) without using it. It counts as waiting until it
        is up, or a model queued for its room would evict it the moment it is READY, and two warms of models that
        don't fit together would evict each other for ever (tests/sim/test_regressions.py)."""
        with self.controller.waiting_for_it():
            await self.ensure_ready()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Endpoint]:
        endpoint = await self.acquire()
        try:
            yield endpoint
        finally:
            self.release()

    async def ensure_ready(self) -> EngineHandle:
        """Returns once the model is READY for this caller (see the module docstring on draining)."""
        controller = self.controller
        name = controller.name
        waited = False  # this caller waited for a start or wake: it is served once it is up
        while True:
            if controller.closed:
                raise ShuttingDown("the gateway is shutting down", model=name)
            if controller.retired:
                raise ModelNotFound(f"The model '{name}' was removed from models.d", model=name)
            state = controller.state
            if state is S.READY and controller.handle is not None:
                if waited or not self._held_back():
                    return controller.handle
                # Draining for a model that waits for room: no new work keeps it alive. Wait for the drain to
                # be lifted or the model to stop (then queue like everyone else).
                seat = self._seat()
                if seat is not None:
                    await seat.changed.wait()
                continue
            if state in (S.STARTING, S.WAKING):
                waited = True
                await controller.join_start()
                if controller.state in (S.STARTING, S.WAKING):
                    await controller.changed().wait()  # a stop took the start over: it ends soon
                continue
            if state is S.STOPPING:
                if controller.operation is not None:
                    await controller.settled()
                else:
                    await controller.changed().wait()
                continue
            if state is S.FAILED and controller.retry_at is not None:
                wait = controller.retry_at - self._clock.now()
                if wait > 0:
                    raise controller.failure_error(retry_after=wait)
            if self._scheduler is None:  # an external endpoint is always READY; anything else is a bug
                raise StartFailed(f"{name} is {state} and is not started by this gateway", model=name)
            before = controller.starts
            try:
                await self._scheduler.admit(name)
            except Withdrawn:
                continue  # asked to ask again: removed (retired above), moved to other nodes, or shutting down
            waited = True
            await controller.join_start(after=before)

    def _seat(self) -> Seat | None:
        return self._scheduler.seats.get(self.controller.name) if self._scheduler is not None else None

    def _held_back(self) -> bool:
        seat = self._seat()
        return seat is not None and bool(seat.drains) and seat.holding_back(self._clock.now())


__all__ = ["Endpoint", "Gate", "Limiter"]
