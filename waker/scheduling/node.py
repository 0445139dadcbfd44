"""The executor of one node's scheduler: the queue of requests waiting for room, and the loop that
turns `scheduler.plan` into starts, wakes, evictions and drains.

Everything here is bookkeeping and side effects; every decision is `plan`'s.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from waker.clock import Clock
from waker.errors import NoRoom, QueueFull, ShuttingDown
from waker.events import Event, EventLog
from waker.runtime.memory import MemoryProbe
from waker.scheduling.budget import Budget
from waker.scheduling.plan import Blocked, ModelView, Snapshot, Ticket, held_gb, plan
from waker.state import ModelState

if TYPE_CHECKING:
    from waker.lifecycle.controller import ModelController

S = ModelState
log = logging.getLogger("sparkgate.admission")


class Admission(Protocol):
    async def admit(self, controller: "ModelController") -> None:
        """Returns once the model has been started or woken (state STARTING/WAKING) for the caller."""
        ...

    def kick(self) -> None:
        """Something changed (a transition, a request ended): plan again soon."""
        ...


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    max_queue: int = 256  # requests waiting for room on one node; beyond: 429
    max_wait: float = 600.0  # longest wait for room; beyond: 503 with the numbers
    max_hold: float = 60.0  # how long a busy model may keep taking new work while others wait for room
    poll_interval: float = 0.25  # re-plan this often while requests wait (live memory coming back)


@dataclass(slots=True)
class _Ticket:
    model: str
    since: float
    waiters: set[asyncio.Future[None]] = field(default_factory=set)
    announced: bool = False


class NodeAdmission:
    """Admission for one node: FIFO tickets (one per model), planned by `scheduler.plan`."""

    def __init__(self, node: str, budget: Budget, probe: MemoryProbe, clock: Clock, events: EventLog,
                 policy: QueuePolicy) -> None:
        self.node = node
        self.budget = budget
        self.probe = probe
        self._clock = clock
        self._events = events
        self.policy = policy
        self._controllers: dict[str, ModelController] = {}
        self._queue: dict[str, _Ticket] = {}  # insertion order = arrival order
        self._blocked: dict[str, Blocked] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.high_water_gb = 0.0

    def register(self, controller: "ModelController") -> None:
        self._controllers[controller.spec.name] = controller

    def unregister(self, name: str) -> None:
        self._controllers.pop(name, None)

    @property
    def queued(self) -> int:
        return sum(len(t.waiters) for t in self._queue.values())

    def queue_of(self, model: str) -> int:
        ticket = self._queue.get(model)
        return len(ticket.waiters) if ticket else 0

    def held_gb(self) -> float:
        return sum(_held(c, self.node) for c in self._controllers.values())

    def exclusive_gb(self, excluding: str) -> float:
        """Memory of the models that may run only here (and on no other node) but hold none now."""
        return sum(c.spec.memory_gb for name, c in self._controllers.items()
                   if name != excluding and len(c.candidates) == c.spec.nodes and _held(c, self.node) == 0)

    def held_by(self, controller: "ModelController") -> float:
        return _held(controller, self.node)

    # -- requests ------------------------------------------------------------------------------------

    async def admit(self, controller: "ModelController") -> None:
        if self._closed:
            raise ShuttingDown("the gateway is shutting down", model=controller.spec.name)
        name = controller.spec.name
        if self.queued >= self.policy.max_queue:
            raise QueueFull(
                f"{self.queued} requests already wait for room on node {self.node!r} (max_queue "
                f"{self.policy.max_queue}); try again shortly", model=name)
        ticket = self._queue.get(name)
        if ticket is None:
            ticket = self._queue[name] = _Ticket(name, self._clock.now())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket.waiters.add(waiter)
        self.step()  # admit at once when it fits: no extra hop through the loop
        try:
            async with asyncio.timeout(self.policy.max_wait):
                await waiter
        except TimeoutError:
            raise NoRoom(self._no_room_message(name), model=name, retry_after=30) from None
        finally:
            ticket.waiters.discard(waiter)
            if not ticket.waiters and self._queue.get(name) is ticket:
                # Nobody waits any more (answered, timed out or left): the ticket goes.
                del self._queue[name]
                self._blocked.pop(name, None)
                self.kick()

    def _no_room_message(self, name: str) -> str:
        blocked = self._blocked.get(name)
        if blocked is None:
            return f"no room could be made for {name} within max_wait ({self.policy.max_wait:g}s)"
        holders = ", ".join(f"{m} ({gb:g} GB, {n} in flight)" for m, gb, n in blocked.holders[:5]) or "nobody"
        return (
            f"{name} needs {blocked.needed_gb:g} GB; {blocked.free_gb:g} GB of the {self.budget.capacity_gb:g} GB "
            f"budget on node {self.node!r} is free; held by {holders}. Waited {self.policy.max_wait:g}s "
            f"({blocked.reason})."
        )

    # -- the loop ------------------------------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            timeout = self.policy.poll_interval if self._queue else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self.step()
            except Exception:  # one bad step must not stop admission for the node
                log.exception("admission step on node %s", self.node)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"admission {self.node}")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for ticket in self._queue.values():
            for waiter in ticket.waiters:
                if not waiter.done():
                    waiter.set_exception(ShuttingDown("the gateway is shutting down", model=ticket.model))

    def snapshot(self) -> Snapshot:
        now = self._clock.now()
        models = {name: _view(c, now, self.node) for name, c in self._controllers.items()}
        queue = tuple(
            Ticket(t.model, t.since, _need(self._controllers[t.model])) for t in self._queue.values() if t.waiters
        )
        return Snapshot(now=now, capacity_gb=self.budget.capacity_gb, models=models, queue=queue,
                        live_free_gb=self.probe.free_gb(), max_hold=self.policy.max_hold)

    def step(self) -> None:
        snap = self.snapshot()
        decided = plan(snap)
        wall = self._clock.wall()
        for name, why in decided.impossible.items():
            ticket = self._queue.pop(name)
            for waiter in ticket.waiters:
                if not waiter.done():
                    waiter.set_exception(NoRoom(why, model=name))
        for name in decided.admit:
            ticket = self._queue.pop(name)
            self._blocked.pop(name, None)
            controller = self._controllers[name]
            need = _need(controller)
            numbers = {"needed_gb": need, "held_gb": round(snap.held_gb, 3), "capacity_gb": snap.capacity_gb,
                       "live_free_gb": snap.live_free_gb, "waited_s": round(snap.now - ticket.since, 3),
                       "requests": len(ticket.waiters)}
            self._events.emit(Event(wall, name, "admit", reason=f"{need:g} GB fits on node {self.node!r}",
                                    data={**numbers, "node": self.node}))
            controller.admitted(self.node)  # starts it, or reserves this node's share of a multi-node model
            for waiter in ticket.waiters:
                if not waiter.done():
                    waiter.set_result(None)
        for name, reason in decided.stop:
            controller = self._controllers[name]
            if controller.stop_if_idle(reason) is not None:
                self._events.emit(Event(wall, name, "evict", reason=reason,
                                        data={"frees_gb": snap.models[name].held_gb}))
        # Drains are recomputed every step: a model nobody waits for any more takes new work again
        # (else its held-back requests would wait forever: test_admission_properties, max_hold 0).
        drains = dict(decided.drain)
        for name, controller in self._controllers.items():
            deadline = drains.get(name)
            if deadline == controller.drain_from(self.node):
                continue  # each node sets and lifts only its own deadline
            if deadline is not None and controller.drain_deadline is None:
                self._events.emit(Event(wall, name, "drain", reason=(
                    f"holds memory others wait for on node {self.node!r}; takes no new work after "
                    f"{max(deadline - snap.now, 0):.0f}s"), data={"deadline_in_s": round(deadline - snap.now, 3),
                                                                "node": self.node}))
            controller.set_drain(deadline, self.node)
        for name, blocked in decided.blocked.items():
            self._blocked[name] = blocked
            ticket = self._queue[name]
            if not ticket.announced:
                ticket.announced = True
                self._events.emit(Event(wall, name, "queued", reason=blocked.reason, data={
                    "needed_gb": blocked.needed_gb, "free_gb": blocked.free_gb,
                    "holders": [list(h) for h in blocked.holders]}))
        self.high_water_gb = max(self.high_water_gb, self.held_gb())


def _held(c: "ModelController", node: str) -> float:
    """What `c` holds in `node`'s ledger: its share where it is placed (each node of a multi-node model
    holds `memory_gb`), including a node reserved for a multi-node start that waits for its other nodes."""
    if node in c.reserved:
        return c.spec.memory_gb
    if node not in c.placed:
        return 0.0
    return held_gb(c.state, c.spec.memory_gb, c.spec.sleeping_gb)


def _need(c: "ModelController") -> float:
    return c.spec.memory_gb - (c.spec.sleeping_gb if c.state is S.SLEEPING else 0.0)


def _view(c: "ModelController", now: float, node: str) -> ModelView:
    # Requests held back from a draining model don't keep it busy: that is the point of draining.
    waiting = 0 if c.holding_back(now) else c.waiting
    # A node reserved for a multi-node start is, to this node's plan, an engine starting: held, not evictable.
    state = S.STARTING if node in c.reserved and c.state in (S.STOPPED, S.FAILED) else c.state
    return ModelView(
        name=c.spec.name, state=state, footprint_gb=c.spec.memory_gb, held_gb=_held(c, node), in_flight=c.in_flight,
        waiting=waiting, last_used=c.last_used or 0.0, pinned=c.pinned, priority=c.spec.priority,
    )


OnChange = Callable[[], None]
