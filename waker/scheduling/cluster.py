"""Admission across nodes: the one owner of scheduling state (every model's seat and every node's queue).

A cold model is placed (`placement.choose`) and queued on its node; each node's admission (node.py) admits
it by its own plan. A model that spans several nodes is admitted by each of them in turn, always in settings
order: a node that admits it holds its share (reserved) while the next one makes room, so two such models
can never hold one node each while waiting for the other's (ordered acquisition). Once every node has
admitted it, `Effects.start` begins it and its waiters are told.

Each ask's outcome (queued, admitted, refused and why, withdrawn) is written to the model's seat as it is
decided (`Seat.record`), and read with its place in the queue through `admission`: the admin API and
`sparkgate warm` show it.

All of this is synchronous (`enqueue`, `withdraw`, `changed`, each node's `step`); `admit` is the async door
requests use, and `start` runs one loop per node that steps when kicked and every `poll_interval` while
tickets wait. Simulations drive the same code without the loops (`settle`).
"""

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from waker.clock import Clock
from waker.errors import NoRoom, QueueFull, ShuttingDown, WakerError, Withdrawn
from waker.events import Event, EventLog
from waker.scheduling.budget import Budget, MemoryProbe
from waker.scheduling.effects import Effects
from waker.scheduling.node import NodeAdmission, Queued, QueuePolicy, Waiter
from waker.scheduling.placement import choose
from waker.scheduling.plan import Snapshot
from waker.scheduling.seat import Admission, Outcome, Seat
from waker.state import Hold, ModelState

S = ModelState
log = logging.getLogger("sparkgate.admission")

Placer = Callable[[str, float, int, Sequence[str], Mapping[str, Snapshot], Mapping[str, float]],
                  tuple[str, ...] | None]
"""Where a cold model starts: (model, GB needed, nodes it spans, candidate nodes, their snapshots, GB of models that
may run only there) -> nodes, or None if it never fits (placement.choose)."""


class _FutureWaiter:
    def __init__(self, future: "asyncio.Future[None]") -> None:
        self._future = future

    def admitted(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def refused(self, error: WakerError) -> None:
        if not self._future.done():
            self._future.set_exception(error)


class ClusterAdmission:
    """Seats and node queues; see the module docstring."""

    def __init__(self, budgets: Mapping[str, Budget], probes: Mapping[str, MemoryProbe], effects: Effects,
                 clock: Clock, events: EventLog, policy: QueuePolicy | None = None, placer: Placer = choose) -> None:
        self.policy = policy or QueuePolicy()
        self._placer = placer  # placement.choose; bench/cluster.py compares others
        self.seats: dict[str, Seat] = {}
        self._effects = effects
        self._clock = clock
        self._events = events
        self.nodes: dict[str, NodeAdmission] = {
            name: NodeAdmission(name, budget, probes[name], self.seats, effects, clock, events, self.policy,
                                self._admitted, self._impossible)
            for name, budget in budgets.items()}
        self._order = list(self.nodes)  # settings order: the order multi-node starts reserve in
        self._where: dict[str, str] = {}  # model -> the node whose queue holds its ticket
        self._wakeups = {name: asyncio.Event() for name in self.nodes}
        self._loops: list[asyncio.Task[None]] = []
        self._closed = False
        self.admissions = 0  # starts and wakes begun (simulations watch it to know a step made progress)

    # -- seats -----------------------------------------------------------------------------------------

    def register(self, model: str, candidates: tuple[str, ...], span: int, footprint_gb: float, sleeping_gb: float,
                 priority: int = 0, pinned: bool = False) -> Seat:
        seat = Seat(model, candidates, span, footprint_gb, sleeping_gb, priority, pinned)
        self.seats[model] = seat
        for node in candidates:
            self.nodes[node].members[model] = None
        return seat

    def update(self, model: str, *, footprint_gb: float, sleeping_gb: float, priority: int, pinned: bool) -> None:
        """New policy from models.d. A running engine keeps the footprint it was admitted with until it stops."""
        seat = self.seats[model]
        resized = footprint_gb != seat.footprint_gb
        seat.footprint_gb, seat.sleeping_gb, seat.priority, seat.pinned = footprint_gb, sleeping_gb, priority, pinned
        where = self._where.get(model)
        if resized and seat.reserved and where is not None:
            # A multi-node start reserving its nodes was admitted at the old size: it starts over, in settings order,
            # at the new one (else it would launch under an entry its reserved nodes count for less).
            node = self.nodes[where]
            ticket = node.tickets.pop(model)
            node.blocked.pop(model, None)
            reserved = set(seat.reserved)
            seat.give_back()
            first = next(n for n in self._order if n in seat.placed)
            ticket.announced = False
            self.nodes[first].tickets[model] = ticket
            self._where[model] = first
            self.kick(reserved)
        self.kick(seat.candidates)

    def move(self, model: str, candidates: tuple[str, ...], span: int) -> bool:
        """Let `model` run on `candidates` from now on; only once it holds nothing anywhere (False: not yet).
        Requests queued for it on its old nodes are told to ask again."""
        seat = self.seats[model]
        if (candidates, span) == (seat.candidates, seat.span):
            return True
        if self._holds(model) or seat.reserved:
            return False
        self.withdraw_all(model, "its nodes changed in models.d")
        for node in seat.candidates:
            self.nodes[node].members.pop(model, None)
        moved = self.register(model, candidates, span, seat.footprint_gb, seat.sleeping_gb, seat.priority, seat.pinned)
        moved.admission = seat.admission
        seat.notify()  # requests waiting on the old seat look again (and find the new one)
        self.kick((*seat.candidates, *candidates))
        return True

    def unregister(self, model: str) -> bool:
        """Forget `model` (gone from models.d) once it holds nothing (False: not yet). Its queued requests are told
        to ask again (and learn it is gone)."""
        seat = self.seats.get(model)
        if seat is None:
            return True
        if self._holds(model):
            return False
        self.withdraw_all(model, "it was removed from models.d")
        for node in seat.candidates:
            self.nodes[node].members.pop(model, None)
        del self.seats[model]
        seat.notify()
        self.kick(seat.candidates)
        return True

    def pin(self, model: str, pinned: bool) -> None:
        seat = self.seats[model]
        seat.pinned = pinned
        self.kick(seat.candidates)

    def fits(self, model: str, nodes: tuple[str, ...], hold: Hold) -> bool:
        """Whether `model` holding `hold` on `nodes` stays within each node's budget (adopting engines at boot)."""
        seat = self.seats[model]
        gb = seat.sleeping_gb if hold is Hold.SLEEPING else seat.footprint_gb
        return all(n in self.nodes and self.nodes[n].held_gb() + gb <= self.nodes[n].budget.capacity_gb
                   for n in nodes)

    def adopted(self, model: str, nodes: tuple[str, ...]) -> None:
        """An engine already running (found at boot) is `model`'s, on `nodes`: it is held there from now on."""
        seat = self.seats[model]
        seat.placed = nodes
        seat.admit(waking=False, holding=False)
        self.kick(nodes)

    def _holds(self, model: str) -> bool:
        return self._effects.usage(model).hold is not Hold.NONE

    # -- requests --------------------------------------------------------------------------------------

    async def admit(self, model: str) -> None:
        """Returns once `model`'s start (or wake) has begun for the caller; NoRoom after max_wait, QueueFull,
        ShuttingDown, or Withdrawn (ask again)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _FutureWaiter(future)
        self.enqueue(model, waiter)
        try:
            async with asyncio.timeout(self.policy.max_wait):
                await future
        except TimeoutError:
            node = self.nodes.get(self._where.get(model, ""))
            message = node.no_room_message(model) if node is not None else (
                f"no room could be made for {model} within max_wait ({self.policy.max_wait:g}s)")
            self.withdraw(model, waiter, refused=message)
            raise NoRoom(message, model=model, retry_after=30) from None
        finally:
            self.withdraw(model, waiter)

    def enqueue(self, model: str, waiter: Waiter) -> None:
        """Queue `waiter` for room for `model` (placing it first if it has no place); it is told once, either way."""
        seat = self.seats.get(model)
        if self._closed:
            self._refuse_ask(seat, waiter, ShuttingDown("the gateway is shutting down", model=model))
            return
        if seat is None:
            waiter.refused(Withdrawn(f"{model} is not scheduled here", model=model))
            return
        where = self._where.get(model)
        if where is None:
            if not seat.placed:
                try:
                    self._place(seat)
                except NoRoom as exc:
                    self._refuse_ask(seat, waiter, exc)
                    return
            where = next(n for n in self._order if n in seat.placed and n not in seat.reserved)
        node = self.nodes[where]
        if node.queued >= self.policy.max_queue:
            full = QueueFull(f"{node.queued} requests already wait for room on node {where!r} (max_queue "
                             f"{self.policy.max_queue}); try again shortly", model=model)
            if model in self._where:
                waiter.refused(full)  # its model's ask goes on for the requests queued already
            else:
                self._give_back(model)
                self._refuse_ask(seat, waiter, full, where)
            return
        ticket = node.tickets.get(model)
        if ticket is None:
            ticket = node.tickets[model] = Queued(model, self._clock.now())
            seat.record(Outcome.QUEUED, ticket.since, node=where, ask=True)
        ticket.waiters.append(waiter)
        self._where[model] = where
        node.step()  # admit at once when it fits: no extra hop through the loop

    def _refuse_ask(self, seat: Seat | None, waiter: Waiter, error: WakerError, node: str | None = None) -> None:
        """A new ask refused at once (no ticket was made for it): recorded as its model's latest admission."""
        if seat is not None:
            seat.record(Outcome.REFUSED, self._clock.now(), error.message, node, ask=True)
        waiter.refused(error)

    def withdraw(self, model: str, waiter: Waiter, refused: str | None = None) -> None:
        """`waiter` no longer waits (it left, or its time is up: `refused`, the message it got); a ticket nobody
        waits on goes, and with it what was reserved for its start, and the ask ends withdrawn (or refused)."""
        where = self._where.get(model)
        if where is None:
            return
        node = self.nodes[where]
        ticket = node.tickets.get(model)
        if ticket is None:
            return
        if waiter in ticket.waiters:
            ticket.waiters.remove(waiter)
        if not ticket.waiters:
            self._drop_ticket(model, node)
            self._record(model, Outcome.REFUSED if refused else Outcome.WITHDRAWN,
                         refused or "nobody waits for it any more", where)
            self._give_back(model)

    def _drop_ticket(self, model: str, node: NodeAdmission) -> Queued | None:
        self._where.pop(model, None)
        node.blocked.pop(model, None)
        ticket = node.tickets.pop(model, None)
        self.kick(self.seats[model].candidates if model in self.seats else (node.name,))
        return ticket

    def withdraw_all(self, model: str, why: str) -> None:
        """Tell every request queued for `model` to ask again (`why`: what changed)."""
        where = self._where.get(model)
        if where is None:
            return
        ticket = self._drop_ticket(model, self.nodes[where])
        self._record(model, Outcome.WITHDRAWN, why, where)
        self._give_back(model)
        for waiter in ticket.waiters if ticket else ():
            waiter.refused(Withdrawn(f"{model}: {why}", model=model))

    def _record(self, model: str, outcome: Outcome, reason: str | None, node: str | None) -> None:
        """The end of `model`'s ask that waited (its seat keeps it for the read model)."""
        seat = self.seats.get(model)
        if seat is not None:
            seat.record(outcome, self._clock.now(), reason, node)

    def _give_back(self, model: str) -> None:
        """Nobody waits for `model`'s start any more: the nodes reserved for it are free again, and one that holds
        nothing is placed afresh next time."""
        seat = self.seats.get(model)
        if seat is None:
            return
        reserved = set(seat.reserved)
        seat.give_back()
        if not self._holds(model):
            seat.release(keep_placement=False)
        self.kick((*reserved, *seat.candidates))

    def _place(self, seat: Seat) -> None:
        snapshots = {n: self.nodes[n].snapshot() for n in seat.candidates}
        exclusive = {n: self.nodes[n].exclusive_gb(excluding=seat.model) for n in seat.candidates}
        nodes = self._placer(seat.model, seat.footprint_gb, seat.span, seat.candidates, snapshots, exclusive)
        if nodes is None:
            raise NoRoom(f"{seat.model} needs {seat.footprint_gb:g} GB on {seat.span} node(s) of "
                         f"{', '.join(seat.candidates)}; pinned models hold too much of them", model=seat.model)
        seat.placed = nodes
        seat.give_back()
        if not seat.fixed:
            self._events.emit(Event(self._clock.wall(), seat.model, "placed", reason=f"on {', '.join(nodes)}", data={
                "nodes": list(nodes), "candidates": list(seat.candidates)}))

    # -- a node's decisions ----------------------------------------------------------------------------

    def _admitted(self, model: str, node: NodeAdmission, ticket: Queued) -> None:
        """`node`'s plan found room for `model`: begin it, or (spanning several nodes) hold this node's share and
        queue the same waiters on the next node in settings order."""
        seat = self.seats[model]
        self._where.pop(model, None)
        if len(seat.placed) > 1:
            seat.reserve(node.name)
            rest = [n for n in self._order if n in seat.placed and n not in seat.reserved]
            if rest:
                ticket.announced = False
                self.nodes[rest[0]].tickets[model] = ticket
                self._where[model] = rest[0]
                self.kick((rest[0],))
                return
        usage = self._effects.usage(model)
        waking = usage.state is S.SLEEPING
        seat.admit(waking=waking, holding=usage.hold is Hold.FULL)
        if self._effects.start(model, seat.placed):
            self.admissions += 1
            self._record(model, Outcome.ADMITTED, f"{'woken' if waking else 'started'} on {', '.join(seat.placed)}",
                         node.name)
            for waiter in ticket.waiters:
                waiter.admitted()
            return
        self._record(model, Outcome.WITHDRAWN, f"{model} could not be started now", node.name)
        self._give_back(model)
        for waiter in ticket.waiters:
            waiter.refused(Withdrawn(f"{model} could not be started now", model=model))

    def _impossible(self, ticket: Queued, why: str) -> None:
        node = self._where.pop(ticket.model, None)
        self._record(ticket.model, Outcome.REFUSED, why, node)
        self._give_back(ticket.model)
        for waiter in ticket.waiters:
            waiter.refused(NoRoom(why, model=ticket.model))

    # -- changes ---------------------------------------------------------------------------------------

    def changed(self, model: str) -> None:
        """Something about `model` changed (a transition, its last request ended): its seat follows, its nodes plan
        again, and requests waiting on the seat look again."""
        seat = self.seats.get(model)
        if seat is None:
            return
        usage = self._effects.usage(model)
        if usage.hold is Hold.NONE and usage.state in (S.STOPPED, S.FAILED):
            seat.release(keep_placement=model in self._where)
        elif usage.state in (S.STARTING, S.WAKING, S.READY) and model in self._where:
            # Started without this queue (an engine found running and adopted): its waiters join that start.
            where = self._where[model]
            ticket = self._drop_ticket(model, self.nodes[where])
            seat.record(Outcome.ADMITTED, self._clock.now(), f"joined its engine, {usage.state.value} already", where)
            seat.give_back()
            for waiter in ticket.waiters if ticket else ():
                waiter.admitted()
        seat.notify()
        self.kick((*seat.candidates, *seat.reserved))

    def kick(self, nodes: Iterable[str] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            wakeup = self._wakeups.get(node)
            if wakeup is not None:
                wakeup.set()

    # -- the loops -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._run(node), name=f"admission {node.name}")
                       for node in self.nodes.values()]

    async def _run(self, node: NodeAdmission) -> None:
        wakeup = self._wakeups[node.name]
        while True:
            timeout = self.policy.poll_interval if node.tickets else None
            try:
                async with asyncio.timeout(timeout):
                    await wakeup.wait()
            except TimeoutError:
                pass
            wakeup.clear()
            try:
                node.step()
            except Exception:  # one bad step must not stop admission for the node
                log.exception("admission step on node %s", node.name)

    def settle(self) -> None:
        """Step every node with something to plan until a round admits nothing more (for simulations, which run
        without the loops)."""
        while True:
            before = self.admissions
            draining = {node for seat in self.seats.values() for node in seat.drains}
            for node in self.nodes.values():
                if node.tickets or node.name in draining:
                    node.step()
            if self.admissions == before:
                return

    async def close(self) -> None:
        """Refuse new requests and tell every waiting one the gateway is shutting down."""
        self._closed = True
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            try:
                await task
            except asyncio.CancelledError:
                pass
        for node in self.nodes.values():
            for ticket in list(node.tickets.values()):
                self._record(ticket.model, Outcome.REFUSED, "the gateway is shutting down", node.name)
                for waiter in ticket.waiters:
                    waiter.refused(ShuttingDown("the gateway is shutting down", model=ticket.model))
            node.tickets.clear()
        self._where.clear()

    # -- reading -----------------------------------------------------------------------------------------

    def queued(self, model: str) -> int:
        where = self._where.get(model)
        return self.nodes[where].queue_of(model) if where is not None else 0

    def admission(self, model: str) -> Admission:
        """`model`'s latest ask for room and its outcome; while it waits, with its node, its place in that node's
        queue (1: the head) and what it waits behind: the models queued ahead of it, then those holding the memory
        (the holders its 503 would name, largest first)."""
        seat = self.seats.get(model)
        if seat is None:
            return Admission()
        where = self._where.get(model)
        node = self.nodes.get(where) if where is not None else None
        if node is None or model not in node.tickets:
            return seat.admission
        queue = [m for m, t in node.tickets.items() if t.waiters or m == model]
        ahead = queue[:queue.index(model)]
        blocked = node.blocked.get(model)
        holders = [h[0] for h in blocked.holders] if blocked is not None else []
        return replace(seat.admission, outcome=Outcome.QUEUED, node=where,
                       reason=blocked.reason if blocked is not None else seat.admission.reason,
                       position=len(ahead) + 1, waiting_for=tuple(dict.fromkeys((*ahead, *holders))))

    def held_on(self, model: str) -> dict[str, float]:
        """GB `model` holds in each node's ledger (nonzero only)."""
        seat = self.seats.get(model)
        if seat is None:
            return {}
        hold = self._effects.usage(model).hold
        return {n: gb for n in dict.fromkeys((*seat.placed, *seat.reserved))
                if n in self.nodes and (gb := seat.held_on(n, hold)) > 0}


__all__ = ["ClusterAdmission", "QueuePolicy"]
