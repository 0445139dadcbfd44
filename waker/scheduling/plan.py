"""Admission and eviction: a pure function from a snapshot of one node to a plan.

No I/O, no clock reads, no awaits: the executor (waker/scheduling/node.py) takes a snapshot, calls
`plan`, and carries the plan out. Every case is tested table-driven and by property tests over
random traces (tests/unit/scheduling/test_plan.py).

Rules (DESIGN.md, Scheduling):
- A queued model starts when its footprint fits in what the ledger has free AND in live free memory.
- Else victims are chosen among models that hold memory, are idle (nothing in flight or waiting)
  and not pinned: sleeping ones before ready ones, then fewest victims, lowest priority, least
  recently used. They are stopped; the start waits until their memory is back.
- If idle victims can't make room, busy unpinned models that would complete the room are marked
  to drain: after `max_hold` from the head's arrival they accept no new work, and they become
  victims the moment they are idle. That bounds how long a hot model can starve a cold one.
- The queue is FIFO across models: a ticket that can't be served yet claims what is free, so a
  later, smaller model can't keep taking the room an earlier one is waiting for.
"""

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from waker.state import HOLDING, ModelState

S = ModelState
EXACT_SEARCH_LIMIT = 14  # candidates; beyond this the victim search is greedy


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    state: ModelState
    footprint_gb: float  # what it holds when READY (memory_gb)
    held_gb: float  # what it holds now in the ledger
    in_flight: int = 0
    waiting: int = 0  # requests waiting on it (other than for room)
    last_used: float = 0.0
    pinned: bool = False
    priority: int = 0

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting == 0

    @property
    def evictable(self) -> bool:
        return self.state in (S.READY, S.SLEEPING) and not self.pinned


@dataclass(frozen=True, slots=True)
class Ticket:
    """Requests waiting for room for one model (one ticket per model: they share one start)."""

    model: str
    since: float  # arrival of its oldest waiter
    need_gb: float  # memory to add: footprint, or footprint minus the sleeping footprint to wake


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    capacity_gb: float  # total - reserve
    models: dict[str, ModelView]
    queue: tuple[Ticket, ...]  # in arrival order
    live_free_gb: float | None = None  # from the memory probe; None = unknown
    max_hold: float = 60.0

    @property
    def held_gb(self) -> float:
        return sum(m.held_gb for m in self.models.values())


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why a ticket waits, in numbers (for events and the 503 message)."""

    needed_gb: float
    free_gb: float
    holders: tuple[tuple[str, float, int], ...]  # (model, GB held, in flight), largest first
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    admit: tuple[str, ...] = ()  # start (or wake) these now, in this order
    stop: tuple[tuple[str, str], ...] = ()  # (model, reason): idle victims to stop now
    drain: tuple[tuple[str, float], ...] = ()  # (model, deadline): busy blockers; no new work after it
    blocked: dict[str, Blocked] = field(default_factory=dict)
    impossible: dict[str, str] = field(default_factory=dict)  # tickets that can never be served


def _pending_allocation(models: Iterable[ModelView]) -> float:
    # A STARTING or WAKING engine has its ledger share but may not have allocated it yet: live free
    # memory still shows it as free, so it is subtracted from live free memory here.
    return sum(m.held_gb for m in models if m.state in (S.STARTING, S.WAKING))


def plan(snap: Snapshot) -> Plan:
    free = snap.capacity_gb - snap.held_gb
    live = None if snap.live_free_gb is None else snap.live_free_gb - _pending_allocation(snap.models.values())
    incoming = sum(m.held_gb for m in snap.models.values() if m.state is S.STOPPING)
    claimed: set[str] = set()  # victims or drainers already promised to an earlier ticket
    admit: list[str] = []
    stops: list[tuple[str, str]] = []
    drains: list[tuple[str, float]] = []
    blocked: dict[str, Blocked] = {}
    impossible: dict[str, str] = {}

    for ticket in snap.queue:
        model = snap.models[ticket.model]
        if model.state not in (S.STOPPED, S.FAILED, S.SLEEPING):
            continue  # still stopping (or already started by someone): next round
        need = ticket.need_gb
        if need <= free and (live is None or need <= live):
            admit.append(ticket.model)
            free -= need
            if live is not None:
                live -= need
            continue

        pinned_gb = sum(m.held_gb for m in snap.models.values() if m.pinned and m.name != ticket.model)
        if need > snap.capacity_gb - pinned_gb:
            impossible[ticket.model] = (
                f"{ticket.model} needs {need:g} GB but only {snap.capacity_gb - pinned_gb:g} GB of the "
                f"{snap.capacity_gb:g} GB budget is not held by pinned models"
            )
            continue

        # Memory already on its way back (engines stopping) counts before any new victim.
        short = max(need - free, 0.0 if live is None else need - live)
        from_release = min(incoming, short)
        incoming -= from_release
        shortfall = short - from_release
        others = [m for m in snap.models.values() if m.name != ticket.model and m.name not in claimed]
        idle = [m for m in others if m.evictable and m.idle]
        victims = choose_victims(idle, shortfall)
        reason = "waiting for memory to be released"
        if victims is not None:
            for v in victims:
                stops.append((v.name, f"making room for {ticket.model} ({need:g} GB needed, {max(free, 0):g} GB free)"))
                claimed.add(v.name)
        else:
            busy = [m for m in others if m.evictable and not m.idle]
            reclaim = choose_victims(idle + busy, shortfall)
            reason = "waiting for busy models to finish their requests"
            if reclaim is None:
                reason = "waiting for models that are starting to become idle"
            else:
                deadline = ticket.since + snap.max_hold
                for v in reclaim:
                    claimed.add(v.name)
                    if v.idle:
                        stops.append((v.name, f"making room for {ticket.model} ({need:g} GB needed)"))
                    else:
                        drains.append((v.name, deadline))
        # This ticket claims whatever is free now: later tickets must not take it.
        free = min(free, 0.0)
        if live is not None:
            live = min(live, 0.0)
        blocked[ticket.model] = Blocked(
            needed_gb=need,
            free_gb=max(snap.capacity_gb - snap.held_gb, 0.0),
            holders=_holders(snap.models.values(), ticket.model),
            reason=reason,
        )
    return Plan(tuple(admit), tuple(stops), tuple(drains), blocked, impossible)


def _holders(models: Iterable[ModelView], exclude: str) -> tuple[tuple[str, float, int], ...]:
    held = [(m.name, m.held_gb, m.in_flight) for m in models if m.held_gb > 0 and m.name != exclude]
    return tuple(sorted(held, key=lambda h: -h[1]))


def _victim_key(m: ModelView) -> tuple[int, int, float]:
    # Sleeping models go first (they serve nothing), then low priority, then least recently used.
    return (0 if m.state is S.SLEEPING else 1, m.priority, m.last_used)


def choose_victims(candidates: Sequence[ModelView], shortfall: float) -> list[ModelView] | None:
    """The best set of models whose release covers `shortfall` GB, or None if none does.

    Fewest victims first; among sets of that size, the one whose members rank lowest by
    (sleeping first, priority, least recently used), compared victim by victim.
    """
    if shortfall <= 0:
        return []
    useful = sorted((m for m in candidates if m.held_gb > 0), key=_victim_key)
    if sum(m.held_gb for m in useful) < shortfall:
        return None
    if len(useful) > EXACT_SEARCH_LIMIT:
        return _greedy(useful, shortfall)
    for size in range(1, len(useful) + 1):
        best: tuple[tuple[tuple[int, int, float], ...], list[ModelView]] | None = None
        for combo in itertools.combinations(useful, size):
            if sum(m.held_gb for m in combo) < shortfall:
                continue
            rank = tuple(sorted((_victim_key(m) for m in combo), reverse=True))
            if best is None or rank < best[0]:
                best = (rank, list(combo))
        if best is not None:
            return best[1]
    return None  # pragma: no cover - the sum check above makes this unreachable


def _greedy(useful: list[ModelView], shortfall: float) -> list[ModelView]:
    chosen: list[ModelView] = []
    for m in useful:
        chosen.append(m)
        if sum(v.held_gb for v in chosen) >= shortfall:
            break
    # Drop victims that turned out unnecessary, most valuable first.
    for m in sorted(chosen, key=_victim_key, reverse=True):
        if sum(v.held_gb for v in chosen) - m.held_gb >= shortfall:
            chosen.remove(m)
    return chosen


def held_gb(state: ModelState, footprint_gb: float, sleeping_gb: float) -> float:
    """What a model in `state` holds in its node's ledger."""
    if state is S.SLEEPING:
        return sleeping_gb
    return footprint_gb if state in HOLDING else 0.0
