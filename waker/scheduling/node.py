"""One node's admission: its budget, its live memory probe, the FIFO queue of tickets waiting for room there,
and the step that turns `plan` into admissions, evictions and drains.

Every decision is `plan`'s (pure); a step only reads the models through `Effects.usage` and acts through
`Effects.evict` and the owner's `admitted` / `impossible` callbacks. The cluster admission (cluster.py)
owns the nodes and the seats and is the only caller.
"""

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from waker.clock import Clock
from waker.errors import WakerError
from waker.events import Event, EventLog
from waker.scheduling.budget import Budget, MemoryProbe
from waker.scheduling.effects import Effects, Usage
from waker.scheduling.plan import Blocked, ModelView, Snapshot, Ticket, plan
from waker.scheduling.seat import Seat
from waker.state import ModelState

S = ModelState
log = logging.getLogger("sparkgate.admission")


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    max_queue: int = 256  # requests waiting for room on one node; beyond: 429
    max_wait: float = 600.0  # longest wait for room; beyond: 503 with the numbers
    max_hold: float = 60.0  # how long a busy model may keep taking new work while others wait for room
    poll_interval: float = 0.25  # re-plan this often while requests wait (live memory coming back)


class Waiter(Protocol):
    """Requests waiting for a model to be admitted: told once, either way."""

    def admitted(self) -> None:
        """The model's start (or wake) has begun."""
        ...

    def refused(self, error: WakerError) -> None:
        ...


@dataclass(slots=True)
class Queued:
    """The requests waiting for room for one model on one node (they share one start)."""

    model: str
    since: float  # arrival of its oldest waiter (drain deadlines count from here)
    waiters: list[Waiter] = field(default_factory=list)
    announced: bool = False  # its "queued" event was emitted


class NodeAdmission:
    """Admission for one node: FIFO tickets (one per model), planned by `plan`."""

    def __init__(self, name: str, budget: Budget, probe: MemoryProbe, seats: Mapping[str, Seat], effects: Effects,
                 clock: Clock, events: EventLog, policy: QueuePolicy,
                 admitted: Callable[[str, "NodeAdmission", Queued], None],
                 impossible: Callable[[Queued, str], None]) -> None:
        self.name = name
        self.budget = budget
        self.probe = probe
        self._seats = seats  # every seat (the cluster's); `members` says which ones may run here
        self._effects = effects
        self._clock = clock
        self._events = events
        self.policy = policy
        self._admitted = admitted
        self._impossible = impossible
        self.members: dict[str, None] = {}  # models registered here, in registration order
        self.tickets: dict[str, Queued] = {}  # insertion order = arrival order
        self.blocked: dict[str, Blocked] = {}
        self.high_water_gb = 0.0

    @property
    def queued(self) -> int:
        return sum(len(t.waiters) for t in self.tickets.values())

    def queue_of(self, model: str) -> int:
        ticket = self.tickets.get(model)
        return len(ticket.waiters) if ticket else 0

    def held_gb(self) -> float:
        return sum(self.held_by(model) for model in self.members)

    def held_by(self, model: str) -> float:
        seat = self._seats[model]
        return seat.held_on(self.name, self._effects.usage(model).hold) if model in self.members else 0.0

    def exclusive_gb(self, excluding: str) -> float:
        """Memory of the models that may run only here (and on no other node) but hold none now."""
        return sum(self._seats[m].footprint_gb for m in self.members
                   if m != excluding and self._seats[m].fixed and self.held_by(m) == 0)

    def snapshot(self) -> Snapshot:
        now = self._clock.now()
        usages = {m: self._effects.usage(m) for m in self.members}
        models = {m: self._view(self._seats[m], usages[m], now) for m in self.members}
        queue = tuple(Ticket(t.model, t.since, self._need(t.model, usages[t.model]))
                      for t in self.tickets.values() if t.waiters and t.model in usages)
        return Snapshot(now=now, capacity_gb=self.budget.capacity_gb, models=models, queue=queue,
                        live_free_gb=self.probe.free_gb(), max_hold=self.policy.max_hold)

    def _need(self, model: str, usage: Usage) -> float:
        return self._seats[model].need_on(self.name, usage.hold, waking=usage.state is S.SLEEPING)

    def _view(self, seat: Seat, usage: Usage, now: float) -> ModelView:
        state = usage.state
        if self.name in seat.reserved and state in (S.STOPPED, S.FAILED):
            state = S.STARTING  # held for a multi-node start that waits for its other nodes: not evictable
        return ModelView(
            name=seat.model, state=state, footprint_gb=seat.footprint_gb, held_gb=seat.held_on(self.name, usage.hold),
            in_flight=usage.in_flight,
            # Requests held back from a draining model don't keep it busy: that is the point of draining.
            waiting=0 if seat.holding_back(now) else usage.waiting,
            last_used=usage.last_used or 0.0, pinned=seat.pinned, priority=seat.priority,
        )

    def step(self) -> None:
        """Plan once and carry the plan out."""
        snap = self.snapshot()
        decided = plan(snap)
        wall = self._clock.wall()
        for model, why in decided.impossible.items():
            ticket = self.tickets.pop(model)
            self.blocked.pop(model, None)
            self._impossible(ticket, why)
        for model in decided.admit:
            ticket = self.tickets.pop(model)
            self.blocked.pop(model, None)
            need = next(t.need_gb for t in snap.queue if t.model == model)
            self._events.emit(Event(wall, model, "admit", reason=f"{need:g} GB fits on node {self.name!r}", data={
                "needed_gb": need, "held_gb": round(snap.held_gb, 3), "capacity_gb": snap.capacity_gb,
                "live_free_gb": snap.live_free_gb, "waited_s": round(snap.now - ticket.since, 3),
                "requests": len(ticket.waiters), "node": self.name}))
            self._admitted(model, self, ticket)
        for model, reason in decided.stop:
            seat = self._seats[model]
            if self._effects.evict(model, reason, ignore_waiting=seat.holding_back(snap.now)):
                self._events.emit(Event(wall, model, "evict", reason=reason,
                                        data={"frees_gb": snap.models[model].held_gb, "node": self.name}))
        self._apply_drains(dict(decided.drain), snap.now, wall)
        for model, blocked in decided.blocked.items():
            ticket = self.tickets.get(model)
            if ticket is None:
                continue
            self.blocked[model] = blocked
            if not ticket.announced:
                ticket.announced = True
                self._events.emit(Event(wall, model, "queued", reason=blocked.reason, data={
                    "needed_gb": blocked.needed_gb, "free_gb": blocked.free_gb, "node": self.name,
                    "holders": [list(h) for h in blocked.holders]}))
        self.high_water_gb = max(self.high_water_gb, self.held_gb())

    def _apply_drains(self, drains: dict[str, float], now: float, wall: float) -> None:
        # Drains are recomputed every step, and each node sets and lifts only its own deadline: a model nobody
        # waits for any more takes new work again (else its held-back requests would wait forever:
        # tests/unit/scheduling/test_admission_properties.py with max_hold 0), and one node can't lift another's.
        for model in self.members:
            seat = self._seats[model]
            deadline = drains.get(model)
            if deadline == seat.drains.get(self.name):
                continue
            if deadline is None:
                del seat.drains[self.name]
            else:
                if seat.drain_deadline is None:
                    self._events.emit(Event(wall, model, "drain", reason=(
                        f"holds memory others wait for on node {self.name!r}; takes no new work after "
                        f"{max(deadline - now, 0):.0f}s"), data={"deadline_in_s": round(deadline - now, 3),
                                                                "node": self.name}))
                seat.drains[self.name] = deadline
            seat.notify()

    def no_room_message(self, model: str) -> str:
        blocked = self.blocked.get(model)
        if blocked is None:
            return f"no room could be made for {model} within max_wait ({self.policy.max_wait:g}s)"
        holders = ", ".join(f"{m} ({gb:g} GB, {n} in flight)" for m, gb, n in blocked.holders[:5]) or "nobody"
        return (
            f"{model} needs {blocked.needed_gb:g} GB; {blocked.free_gb:g} GB of the {self.budget.capacity_gb:g} GB "
            f"budget on node {self.name!r} is free; held by {holders}. Waited {self.policy.max_wait:g}s "
            f"({blocked.reason})."
        )


__all__ = ["NodeAdmission", "QueuePolicy", "Queued", "Waiter"]
