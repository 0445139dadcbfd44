"""A model's seat: everything the scheduling side knows of one model, owned by the cluster admission alone.

Where it may run (candidates), where it runs or was placed to start (placed), the nodes already holding
its share of a multi-node start (reserved), the drain deadline each node set for it, whether it is
pinned, the footprint its running engine was admitted with, and how its latest ask for room went
(admission). The controller knows none of this; it only starts, stops and reports.
"""

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum

from waker.state import Hold


class Outcome(StrEnum):
    """How a model's latest ask for room ended, or that it still waits."""

    QUEUED = "queued"  # waits for memory on a node
    ADMITTED = "admitted"  # its start (or wake) began
    REFUSED = "refused"  # no room now or ever, the queue full, the gateway shutting down
    WITHDRAWN = "withdrawn"  # nobody waits for it any more (its requests left; models.d moved or removed it)


@dataclass(frozen=True, slots=True)
class Admission:
    """A model's latest ask for room (a request's or a warm's) and its outcome, in the words its requests were
    given; the read model copies it (status.Admission). `attempt` counts the asks, each queued or refused at once
    (requests that join a queued one share it): an operator who asked tells its own outcome from an older one
    (tests/integration/test_warm_admission.py). While it waits, the cluster admission adds where (`node`,
    `position`, 1 at the head) and behind what (`waiting_for`: the models queued ahead, then those holding the
    memory)."""

    outcome: Outcome | None = None  # None: never asked since the gateway started
    reason: str | None = None
    since: float | None = None  # when the outcome began (the waker clock)
    attempt: int = 0
    node: str | None = None
    position: int | None = None
    waiting_for: tuple[str, ...] = ()


@dataclass(slots=True)
class Seat:
    model: str
    candidates: tuple[str, ...]  # nodes it may run on, settings order
    span: int  # nodes one instance spans
    footprint_gb: float  # memory_gb as declared now: what the next start needs on each node
    sleeping_gb: float  # what it holds asleep, as declared now
    priority: int = 0
    pinned: bool = False
    placed: tuple[str, ...] = ()  # where it runs, or where its next start goes (head first)
    reserved: set[str] = field(default_factory=set)  # nodes holding its share while a multi-node start waits
    drains: dict[str, float] = field(default_factory=dict)  # node -> deadline after which it takes no new work
    starting_gb: float | None = None  # footprint of the start being admitted, fixed when its first node admits it
    admitted_gb: float | None = None  # footprint the running engine was admitted with (a reload may change
    admitted_sleeping_gb: float | None = None  # memory_gb meanwhile: that applies from the next start)
    admission: Admission = field(default_factory=Admission)  # its latest ask for room (written by record())
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if len(self.candidates) == self.span:
            self.placed = self.candidates  # no choice to make

    @property
    def fixed(self) -> bool:
        """It may run only where it is placed (no choice): its placement outlives its engine."""
        return len(self.candidates) == self.span

    @property
    def drain_deadline(self) -> float | None:
        """The earliest deadline any node set: a model spanning nodes drains when any of them asks."""
        return min(self.drains.values(), default=None)

    def holding_back(self, now: float) -> bool:
        """True when the model takes no new work: it is draining and its hold time is over."""
        deadline = self.drain_deadline
        return deadline is not None and now >= deadline

    def held_on(self, node: str, hold: Hold) -> float:
        """GB this model holds in `node`'s ledger when its engine holds `hold`."""
        if node in self.reserved:
            return self._start_gb()  # held for the start that waits for its other nodes
        if node not in self.placed or hold is Hold.NONE:
            return 0.0
        if hold is Hold.SLEEPING:
            return self.admitted_sleeping_gb if self.admitted_sleeping_gb is not None else self.sleeping_gb
        return self.admitted_gb if self.admitted_gb is not None else self.footprint_gb

    def need_on(self, node: str, hold: Hold, waking: bool) -> float:
        """GB its next start (or wake, `waking`) adds on `node`: what it will hold there less what it holds
        already (an engine that may still run from before is replaced by the start, not added to)."""
        target = self.admitted_gb if waking and self.admitted_gb is not None else self._start_gb()
        if hold is Hold.FULL and self.admitted_gb is not None:
            target = max(target, self.admitted_gb)  # what it leaves running is counted until it is gone
        return max(target - self.held_on(node, hold), 0.0)

    def reserve(self, node: str) -> None:
        """`node` admitted this multi-node start and holds its share while the others make room. The footprint
        is fixed from the first one on: a reload meanwhile can't raise what the reserved nodes hold."""
        if self.starting_gb is None:
            self.starting_gb = self.footprint_gb
        self.reserved.add(node)

    def admit(self, waking: bool, holding: bool) -> None:
        """Its start or wake begins now on `placed`: the footprint it holds is fixed until its engine is gone (a
        wake keeps the one it was started with; a start over an engine that may still run, `holding`, counts the
        larger of the two until it stops)."""
        if not waking or self.admitted_gb is None:
            gb, sleeping = self._start_gb(), self.sleeping_gb
            if holding and self.admitted_gb is not None:
                gb = max(gb, self.admitted_gb)
                sleeping = max(sleeping, self.admitted_sleeping_gb or 0.0)
            self.admitted_gb, self.admitted_sleeping_gb = gb, sleeping
        self.give_back()

    def give_back(self) -> None:
        """The nodes reserved for a start are free again (it began, or nobody waits for it any more)."""
        self.reserved.clear()
        self.starting_gb = None

    def _start_gb(self) -> float:
        return self.starting_gb if self.starting_gb is not None else self.footprint_gb

    def release(self, keep_placement: bool) -> None:
        """Its engine is gone: it holds nothing, drains nowhere, and (unless it may run only where it was, or a
        request is on its way to a node) is placed afresh at its next start."""
        self.admitted_gb = self.admitted_sleeping_gb = None
        self.drains.clear()
        if not keep_placement and not self.fixed and not self.reserved:
            self.placed = ()

    def record(self, outcome: Outcome, now: float, reason: str | None = None, node: str | None = None, *,
               ask: bool = False) -> None:
        """The outcome of its latest ask for room: a new ask (`ask`: queued, or refused at once) or the end of the
        one that waited (admitted, refused after max_wait or as impossible, withdrawn)."""
        attempt = self.admission.attempt + 1 if ask else self.admission.attempt
        self.admission = Admission(outcome, reason, now, attempt, node)

    def notify(self) -> None:
        """Wake the requests waiting on this seat (a drain set or lifted, a transition): they look again."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


__all__ = ["Admission", "Outcome", "Seat"]
