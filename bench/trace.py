"""Trace replay: the waker's scheduling (`waker.scheduling.cluster.ClusterAdmission`) against two baselines, by
discrete-event simulation.

What it measures
----------------
One node with a memory budget and N models with footprints. A trace of requests (arrival time, model,
duration) is replayed against each policy, and the script prints: requests answered / total, cold
starts, evictions (stops made to free memory for another model), idle stops, mean / p99 / max queue
wait (arrival until the model is ready for the request and it starts running), mean request latency
(arrival to end = wait + duration), the budget high-water mark (most GB held at any instant) and when
the last request ended; then the mean and p99 wait per model.

Method
------
Events (arrival, request end, engine ready, engine stopped, drain deadline, idle check) sit in a heap
keyed by (time, sequence number); after each event the policy decides and the held GB is audited.
Nothing sleeps, and a run is deterministic for one `--seed`. Shared model of the world: a request holds
its model for its duration, with no limit on concurrent requests per engine and no slowdown under load;
a cold start takes `load_s` (default 5 s + 0.5 s per GB, or per model in --models); a stop takes
`--stop-s` (default 2 s) and its memory counts as held until it ends. Nobody gives up waiting.

Policies
--------
sparkgate      the waker's executor itself, not a copy: one `ClusterAdmission` (seats, the node's FIFO
               tickets, `plan` per step, drains per node, evictions) built as the waker builds it, with a
               `FakeClock` set to the simulated time before every event, a quiet `EventLog`, a
               `FixedProbe(None)` (the ledger is the only limit), `Budget(budget_gb, 0)` and
               `QueuePolicy(max_hold, max_wait=inf, max_queue=no limit)`. `SparkgateSim` implements
               `waker.scheduling.effects.Effects` over the simulated engines: usage -> state, hold, in flight,
               waiting, last_used; start -> STARTING, READY after load_s; evict -> only if still idle
               (`stop_if_idle`) -> STOPPING -> STOPPED after stop_s. Every transition and every last request
               end calls `ClusterAdmission.changed` (the controller's on_change), and `settle()` steps the
               node after every event and at every drain deadline (read from the seats). Requests go through
               a simulation of the gate (waker/gate.py): READY and not held back -> runs at once; READY and
               held back by a drain past its deadline -> waits until the drain is lifted (then runs) or the
               model has stopped (then queues); STARTING -> joins the start (served once up, draining or
               not); STOPPING -> waits for the stop, then queues; else `ClusterAdmission.enqueue` with a
               waiter that joins the start once admitted. The idle reaper is the waker's own policy
               (`waker.scheduling.reaper.idle_stops`), asked when a model is due: `--idle-timeout` (default
               900 s, ModelSpec's default; 0 = off) and `--min-uptime` (60 s); its stops count as idle stops,
               not evictions.
one-at-a-time  llama-swap's default: one model loaded at a time. Requests are taken in arrival order
               (llama-swap's swap lock): a request for another model waits until the loaded model has
               nothing in flight, stops it, starts its own and runs; everyone behind it waits, even
               requests for the model that is loaded (head-of-line blocking).
static-groups  llama-swap groups (swap off inside a group, exclusive across groups): fixed groups
               (`--groups "a,b;c"`, default first fit by size, smallest first). Members of the resident
               group start lazily on their first request and then stay; a request for a model of another
               group waits until the whole group is idle, stops all of it, and starts its model once
               every member has stopped. Arrival order as for one-at-a-time.

Checks: for every policy and run, after every event, held GB never above the budget (sparkgate: the
executor's own ledger, `Seat.held_on` over every seat, and the engines started on the node never holding
more than that ledger says), and at the end every request answered. A violation is printed (stderr) after
the tables and the exit status is 1.

Default scenario (DGX Spark): budget 120 GB (128 GB - 8 GB reserve); six models, 139 GB in all, so
not everything fits at once; a generated 1-hour trace of about 2000 requests:

    model            GB   load s  traffic                                              mean duration
    gpt-oss-120b     70   40      occasional sessions: 4/h, ~3 min each, 24 req/h      30 s
    qwen3-coder-30b  35   22.5    frequent short requests, Poisson 500/h              4 s
    gpt-oss-20b      16   13      main chat in bursts: 6/h, ~5 min each, 360 req/h     10 s
    embed             2   6       constant, Poisson 600/h                              0.3 s
    small-utility     6   8       constant, Poisson 400/h                              1.5 s
    llama-8b         10   10      Poisson 120/h                                        5 s

Bursts: burst starts are Poisson, each lasts an exponential time around its mean, and inside a burst
requests are Poisson at the rate that gives the hourly mean. Durations are exponential per model
(at least 0.05 s). Each model draws from its own random stream.

Inputs
------
--trace FILE.csv    columns t_seconds, model, duration_s (a header row is optional)
--models FILE.yaml  a list (or {models: [...]}) of {name, memory_gb, load_s?, pinned?, priority?} plus,
                    for generated traces, pattern (poisson|bursts), rate_per_hour, mean_duration_s,
                    bursts_per_hour, burst_len_s
--budget-gb, --seed, --seeds N (N generated traces, a per-seed table and a summary), --hours,
--max-hold, --stop-s, --idle-timeout, --min-uptime, --load-base, --load-per-gb, --groups,
--policy NAME (repeatable), --json

    .venv/bin/python bench/trace.py
    .venv/bin/python bench/trace.py --seeds 30

`sparkgate-sticky`, a copy of the executor before 17b06b3 (drain deadlines kept until the model stopped), was
dropped when the simulation moved onto the real executor; it is in bench/trace.py up to 4e447d2 (bench/README.md).
"""

import argparse
import csv
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from waker.clock import Clock, FakeClock
from waker.config.spec import ModelSpec
from waker.errors import WakerError, Withdrawn
from waker.events import Event, EventLog
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.cluster import ClusterAdmission, Placer
from waker.scheduling.effects import Usage
from waker.scheduling.node import QueuePolicy
from waker.scheduling.placement import choose
from waker.scheduling.plan import held_gb
from waker.scheduling.reaper import idle_stops
from waker.state import HOLDING, Hold, ModelState

S = ModelState
EPS = 1e-9
POLICIES = ("sparkgate", "one-at-a-time", "static-groups")
DEFAULT_POLICIES = POLICIES


# -- inputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelDef:
    name: str
    memory_gb: float
    load_s: float
    pinned: bool = False
    priority: int = 0
    # Only for generated traces.
    pattern: str = "poisson"  # poisson | bursts
    rate_per_hour: float = 0.0
    mean_duration_s: float = 5.0
    bursts_per_hour: float = 4.0
    burst_len_s: float = 300.0

    @property
    def sleeping_gb(self) -> float:
        return min(2.0, self.memory_gb)  # ModelSpec's default; never used: nothing sleeps here


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    t: float
    model: str
    duration: float


def load_time(gb: float, base: float, per_gb: float) -> float:
    return base + gb * per_gb


def default_models(base: float, per_gb: float) -> list[ModelDef]:
    def m(name: str, gb: float, **kw: Any) -> ModelDef:
        return ModelDef(name, gb, load_time(gb, base, per_gb), **kw)

    return [
        m("gpt-oss-120b", 70, pattern="bursts", rate_per_hour=24, bursts_per_hour=4, burst_len_s=180,
          mean_duration_s=30),
        m("qwen3-coder-30b", 35, rate_per_hour=500, mean_duration_s=4),
        m("gpt-oss-20b", 16, pattern="bursts", rate_per_hour=360, bursts_per_hour=6, burst_len_s=300,
          mean_duration_s=10),
        m("embed", 2, rate_per_hour=600, mean_duration_s=0.3),
        m("small-utility", 6, rate_per_hour=400, mean_duration_s=1.5),
        m("llama-8b", 10, rate_per_hour=120, mean_duration_s=5),
    ]


def read_models(path: Path, base: float, per_gb: float) -> list[ModelDef]:
    raw = yaml.safe_load(path.read_text())
    items = raw["models"] if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise SystemExit(f"{path}: expected a list of models (or {{models: [...]}})")
    known = {f.name for f in fields(ModelDef)}
    models = []
    for item in items:
        extra = set(item) - known
        if extra:
            raise SystemExit(f"{path}: unknown keys {sorted(extra)} in {item.get('name', item)}")
        gb = float(item["memory_gb"])
        item = {**item, "memory_gb": gb, "load_s": float(item.get("load_s", load_time(gb, base, per_gb)))}
        models.append(ModelDef(**item))
    return models


def generate_trace(models: Sequence[ModelDef], hours: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    horizon = hours * 3600.0
    events: list[tuple[float, str, float]] = []
    for m in models:
        # One stream per model, drawn in model order: adding a model leaves the others' traffic alone.
        r = random.Random(rng.random())
        if m.rate_per_hour <= 0:
            continue
        if m.pattern == "poisson":
            windows = [(0.0, horizon)]
            rate = m.rate_per_hour / 3600.0
        elif m.pattern == "bursts":
            windows = []
            t = r.expovariate(m.bursts_per_hour / 3600.0)
            while t < horizon:
                windows.append((t, min(t + r.expovariate(1.0 / m.burst_len_s), horizon)))
                t += r.expovariate(m.bursts_per_hour / 3600.0)
            rate = m.rate_per_hour / (m.bursts_per_hour * m.burst_len_s)
        else:
            raise SystemExit(f"{m.name}: unknown pattern {m.pattern!r} (poisson or bursts)")
        for start, end in windows:
            t = start + r.expovariate(rate)
            while t < end:
                events.append((t, m.name, max(0.05, r.expovariate(1.0 / m.mean_duration_s))))
                t += r.expovariate(rate)
    events.sort()
    return [Request(i, t, name, d) for i, (t, name, d) in enumerate(events)]


def read_trace(path: Path, models: Iterable[str]) -> list[Request]:
    names = set(models)
    rows: list[tuple[float, str, float]] = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or row[0].lstrip().startswith("#"):
                continue
            try:
                t, model, duration = float(row[0]), row[1].strip(), float(row[2])
            except (ValueError, IndexError):
                if n == 1:
                    continue  # header
                raise SystemExit(f"{path}:{n}: expected t_seconds,model,duration_s, got {row}") from None
            if model not in names:
                raise SystemExit(f"{path}:{n}: unknown model {model!r} (known: {', '.join(sorted(names))})")
            rows.append((t, model, duration))
    rows.sort()
    return [Request(i, t, m, d) for i, (t, m, d) in enumerate(rows)]


def first_fit_groups(models: Sequence[ModelDef], budget: float) -> list[list[str]]:
    """First fit, smallest model first: the many small models share a group and the big ones end up
    alone. (Largest first packs 120b+coder+llama+embed | 20b+utility here: constant traffic on both
    groups, a swap every few seconds; pass that with --groups to see it.)"""
    groups: list[tuple[float, list[str]]] = []
    for m in sorted(models, key=lambda m: m.memory_gb):
        for i, (gb, names) in enumerate(groups):
            if gb + m.memory_gb <= budget + EPS:
                groups[i] = (gb + m.memory_gb, [*names, m.name])
                break
        else:
            groups.append((m.memory_gb, [m.name]))
    return [names for _, names in groups]


def parse_groups(text: str, models: Sequence[ModelDef], budget: float) -> list[list[str]]:
    by_name = {m.name: m for m in models}
    groups = [[n.strip() for n in g.split(",") if n.strip()] for g in text.split(";") if g.strip()]
    seen = [n for g in groups for n in g]
    if sorted(seen) != sorted(by_name):
        raise SystemExit(f"--groups must name every model exactly once: {sorted(by_name)}")
    for g in groups:
        if sum(by_name[n].memory_gb for n in g) > budget + EPS:
            raise SystemExit(f"--groups: group {g} does not fit the {budget:g} GB budget")
    return groups


# -- simulation core -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimConfig:
    budget_gb: float
    stop_s: float
    max_hold: float
    idle_timeout: float
    min_uptime: float


@dataclass(slots=True)
class Served:
    start: float | None = None
    end: float | None = None
    rejected: str | None = None


@dataclass(slots=True)
class Result:
    policy: str
    detail: str
    total: int
    answered: int
    rejected: int
    cold_starts: int
    evictions: int
    idle_stops: int
    wait_mean: float
    wait_p99: float
    wait_max: float
    latency_mean: float
    high_water_gb: float
    last_end: float
    per_model: dict[str, dict[str, float]]
    violations: list[str] = field(default_factory=list)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class Sim:
    """Event heap, engines (state, in flight, requests waiting for a start), counters and the audit."""

    policy = ""

    def __init__(self, models: Sequence[ModelDef], cfg: SimConfig) -> None:
        self.models = {m.name: m for m in models}
        self.cfg = cfg
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.state = dict.fromkeys(self.models, S.STOPPED)
        self.in_flight = dict.fromkeys(self.models, 0)
        self.attached: dict[str, list[Request]] = {n: [] for n in self.models}  # waiting for a start
        self.served: dict[int, Served] = {}
        self.cold_starts = self.evictions = self.idle_stops = 0
        self.high_water = 0.0
        self.violations: list[str] = []

    def detail(self) -> str:
        return ""

    # events
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def run(self, trace: Sequence[Request]) -> Result:
        for r in trace:
            self.served[r.id] = Served()
            self.at(r.t, partial(self.arrive, r))
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            self.set_time(t)
            fn()
            self.settle()
            self.audit()
        return self.result(trace)

    def set_time(self, t: float) -> None:
        self.now = t

    def audit(self) -> None:
        held = self.held()
        self.high_water = max(self.high_water, held)
        if held > self.cfg.budget_gb + EPS and len(self.violations) < 5:
            states = ", ".join(f"{n} {s}" for n, s in self.state.items() if s is not S.STOPPED)
            self.violations.append(f"t={self.now:.1f}s held {held:g} GB > budget {self.cfg.budget_gb:g} GB ({states})")

    def held(self) -> float:
        return sum(held_gb(self.state[n], m.memory_gb, m.sleeping_gb) for n, m in self.models.items())

    # engines and requests
    def begin(self, r: Request) -> None:
        self.served[r.id].start = self.now
        self.in_flight[r.model] += 1
        self.at(self.now + r.duration, partial(self._end, r))

    def _end(self, r: Request) -> None:
        self.served[r.id].end = self.now
        self.in_flight[r.model] -= 1
        self.ended(r)

    def start_engine(self, name: str) -> None:
        assert self.state[name] is S.STOPPED, (name, self.state[name])
        self.state[name] = S.STARTING
        self.cold_starts += 1
        self.at(self.now + self.models[name].load_s, partial(self._ready, name))

    def _ready(self, name: str) -> None:
        self.state[name] = S.READY
        waiters, self.attached[name] = self.attached[name], []
        for r in waiters:
            self.begin(r)
        self.ready(name)

    def stop_engine(self, name: str, idle: bool = False) -> None:
        assert self.state[name] is S.READY and not self.in_flight[name], (name, self.state[name])
        self.state[name] = S.STOPPING
        if idle:
            self.idle_stops += 1
        else:
            self.evictions += 1
        self.at(self.now + self.cfg.stop_s, partial(self._stopped, name))

    def _stopped(self, name: str) -> None:
        self.state[name] = S.STOPPED
        self.stopped(name)

    # policy hooks
    def arrive(self, r: Request) -> None:
        raise NotImplementedError

    def ended(self, r: Request) -> None:
        pass

    def ready(self, name: str) -> None:
        pass

    def stopped(self, name: str) -> None:
        pass

    def settle(self) -> None:
        """Called after every event: the policy's decisions."""

    def stuck(self) -> str:
        return ""

    # figures
    def result(self, trace: Sequence[Request]) -> Result:
        waits: list[float] = []
        latencies: list[float] = []
        by_model: dict[str, list[float]] = {n: [] for n in self.models}
        answered = rejected = 0
        for r in trace:
            s = self.served[r.id]
            if s.rejected is not None:
                rejected += 1
            elif s.start is not None and s.end is not None:
                answered += 1
                waits.append(s.start - r.t)
                latencies.append(s.end - r.t)
                by_model[r.model].append(s.start - r.t)
        violations = list(self.violations)
        if answered + rejected < len(trace):
            violations.append(f"{len(trace) - answered - rejected} requests never answered: {self.stuck()}")
        if rejected:
            violations.append(f"{rejected} requests rejected as impossible")
        return Result(
            policy=self.policy, detail=self.detail(), total=len(trace), answered=answered, rejected=rejected,
            cold_starts=self.cold_starts, evictions=self.evictions, idle_stops=self.idle_stops,
            wait_mean=mean(waits), wait_p99=percentile(waits, 99), wait_max=max(waits, default=0.0),
            latency_mean=mean(latencies), high_water_gb=self.high_water,
            last_end=max((s.end for s in self.served.values() if s.end is not None), default=0.0),
            per_model={n: {"requests": len(w), "wait_mean": mean(w), "wait_p99": percentile(w, 99)}
                       for n, w in by_model.items()},
            violations=violations,
        )


# -- sparkgate: the waker's executor (waker.scheduling.cluster.ClusterAdmission) over simulated engines ------------


class SimEvents(EventLog):
    """A quiet event log: nothing is logged or kept. It counts the executor's decisions by kind and keeps the
    placements and evictions it reports, at simulated time."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(keep=0)
        self._clock = clock
        self.counts: Counter[str] = Counter()
        self.placed: list[tuple[float, str, tuple[str, ...]]] = []  # (t, model, nodes)
        self.evicted: list[tuple[float, str, str, str]] = []  # (t, node, victim, reason)

    def emit(self, event: Event) -> None:
        self.counts[event.kind] += 1
        if event.kind == "placed":
            self.placed.append((self._clock.now(), event.model, tuple(event.data["nodes"])))
        elif event.kind == "evict":
            self.evicted.append((self._clock.now(), event.data["node"], event.model, event.reason))


@dataclass(frozen=True, slots=True)
class _IdleView:
    """One model as the idle policy (waker.scheduling.reaper.idle_stops) reads it."""

    name: str
    spec: ModelSpec
    state: ModelState
    in_flight: int
    waiting: int
    last_used: float | None
    ready_since: float | None


class _Waiter:
    """One request queued for room (waker.scheduling.node.Waiter): told once that its model's start has begun, or
    why not."""

    __slots__ = ("request", "sim")

    def __init__(self, sim: "SparkgateSim", request: Request) -> None:
        self.sim, self.request = sim, request

    def admitted(self) -> None:
        self.sim.joined_start(self.request)

    def refused(self, error: WakerError) -> None:
        self.sim.refused(self.request, error)


def sim_spec(m: ModelDef, cfg: SimConfig, **placement: Any) -> ModelSpec:
    """The models.d entry of a simulated model (what placement.candidates and the idle policy read)."""
    return ModelSpec(name=m.name, engine="vllm", runtime="docker", image="sim", model="sim", memory_gb=m.memory_gb,
                     idle_timeout=cfg.idle_timeout, min_uptime=cfg.min_uptime, pinned=m.pinned, priority=m.priority,
                     **placement)


class SparkgateSim(Sim):
    """The waker's scheduling as it runs in production: one `ClusterAdmission` (seats, node queues, `plan` per node,
    placement, reservations, drains) acting through `Effects` implemented here over the simulated engines, and
    requests that go through a simulation of the gate (waker/gate.py). One node ("local") unless `budgets` says
    otherwise (bench/cluster.py)."""

    policy = "sparkgate"

    def __init__(self, models: Sequence[ModelDef], cfg: SimConfig, *, budgets: Mapping[str, Budget] | None = None,
                 candidates: Mapping[str, tuple[str, ...]] | None = None, span: Mapping[str, int] | None = None,
                 placer: Placer = choose, policy: str = "sparkgate") -> None:
        super().__init__(models, cfg)
        self.policy = policy
        budgets = dict(budgets) if budgets is not None else {"local": Budget(total_gb=cfg.budget_gb, reserve_gb=0.0)}
        self.capacity = {n: b.capacity_gb for n, b in budgets.items()}
        self.clock = FakeClock(start=0.0)
        self.events = SimEvents(self.clock)
        # Nobody gives up and nothing is refused for load: the figures measure waits (a 429 or 503 would be an
        # answer the simulation doesn't model).
        queue = QueuePolicy(max_queue=sys.maxsize, max_wait=math.inf, max_hold=cfg.max_hold)
        self.cluster = ClusterAdmission(budgets, {n: FixedProbe(None) for n in budgets}, self, self.clock,
                                        self.events, queue, placer)
        self.specs = {m.name: sim_spec(m, cfg) for m in models}
        for m in models:
            where = candidates[m.name] if candidates is not None else tuple(budgets)
            self.cluster.register(m.name, where, span[m.name] if span is not None else 1, m.memory_gb,
                                  m.sleeping_gb, m.priority, m.pinned)
        self.running_on: dict[str, tuple[str, ...]] = {}  # model -> nodes its engine was started on
        # Requests inside the gate, not yet in flight (ModelController.waiting counts them all):
        self.queued: dict[str, list[Request]] = {n: [] for n in self.models}  # for room (a ticket's waiters)
        self.held_back: dict[str, list[Request]] = {n: [] for n in self.models}  # by a drain past its deadline
        self.wait_stop: dict[str, list[Request]] = {n: [] for n in self.models}  # arrived while STOPPING
        self.last_used: dict[str, float | None] = dict.fromkeys(self.models)
        self.ready_since: dict[str, float | None] = dict.fromkeys(self.models)
        self.node_high_water = dict.fromkeys(self.capacity, 0.0)
        self._replans: set[float] = set()  # drain deadlines with a planning event already in the heap

    def detail(self) -> str:
        idle = f"idle_timeout {self.cfg.idle_timeout:g}s" if self.cfg.idle_timeout > 0 else "no idle stop"
        return f"max_hold {self.cfg.max_hold:g}s, {idle}, {self.events.counts['drain']} drains set"

    def set_time(self, t: float) -> None:
        super().set_time(t)
        # FakeClock moves by differences; a second step corrects the rounding of the first (it is exact then), so
        # the executor sees exactly the simulation's time (drain deadlines are compared with it).
        while self.clock.now() != t:
            self.clock.advance(t - self.clock.now())

    # -- Effects (waker.scheduling.effects): what the executor reads of a model and does to it -------------------

    def usage(self, model: str) -> Usage:
        state = self.state[model]
        return Usage(state, Hold.FULL if state in HOLDING else Hold.NONE, self.in_flight[model], self.waiting(model),
                     self.last_used[model])

    def start(self, model: str, nodes: tuple[str, ...]) -> bool:
        self.running_on[model] = nodes
        self.start_engine(model)
        self.cluster.changed(model)  # the controller's on_change, at every transition
        return True

    def evict(self, model: str, reason: str, *, ignore_waiting: bool) -> bool:
        # ModelController.stop_if_idle: a request that took the model since the plan wins.
        if self.state[model] is not S.READY or self.in_flight[model] or (self.waiting(model) and not ignore_waiting):
            return False
        self.stop_engine(model)
        self.cluster.changed(model)
        return True

    # -- the gate (waker/gate.py: Gate.acquire / ensure_ready) --------------------------------------------------

    def waiting(self, name: str) -> int:
        """ModelController.waiting: every request inside acquire() that is not in flight yet."""
        return (len(self.attached[name]) + len(self.held_back[name]) + len(self.wait_stop[name])
                + len(self.queued[name]))

    def held_back_now(self, name: str) -> bool:
        """Gate._held_back: the model drains and its hold time is over (it takes no new work)."""
        seat = self.cluster.seats[name]
        return bool(seat.drains) and seat.holding_back(self.now)

    def arrive(self, r: Request) -> None:
        state = self.state[r.model]
        if state is S.READY and not self.held_back_now(r.model):
            self.begin(r)
        elif state is S.READY:
            self.held_back[r.model].append(r)  # until the drain is lifted (then it runs) or the model has stopped
        elif state is S.STARTING:
            self.attached[r.model].append(r)  # joins the one start; served once up, draining or not
        elif state is S.STOPPING:
            self.wait_stop[r.model].append(r)  # waits for the stop, then queues for room
        else:
            self.queued[r.model].append(r)  # counted as waiting before the executor's step looks
            self.cluster.enqueue(r.model, _Waiter(self, r))

    def joined_start(self, r: Request) -> None:
        """Its model's start has begun (ClusterAdmission told the waiter): it joins the start."""
        self.queued[r.model].remove(r)
        self.attached[r.model].append(r)

    def refused(self, r: Request, error: WakerError) -> None:
        self.queued[r.model].remove(r)
        if isinstance(error, Withdrawn):
            self.arrive(r)  # asked to ask again
        else:
            self.served[r.id].rejected = f"{type(error).__name__}: {error}"

    # -- transitions: each one is reported to the executor (ModelController's on_change) ------------------------

    def ended(self, r: Request) -> None:
        self.last_used[r.model] = self.now
        if self.in_flight[r.model] == 0:
            self.cluster.changed(r.model)  # ModelController.release: a drained model may be the victim awaited
            self.schedule_reap(r.model)

    def ready(self, name: str) -> None:
        self.last_used[name] = self.ready_since[name] = self.now
        self.cluster.changed(name)
        if self.in_flight[name] == 0:
            self.schedule_reap(name)

    def stopped(self, name: str) -> None:
        self.running_on.pop(name, None)
        self.ready_since[name] = None
        self.cluster.changed(name)  # the seat lets its placement go before its waiters queue again
        # Held-back requests and those that waited for the stop go through admission again.
        requests = self.held_back[name] + self.wait_stop[name]
        self.held_back[name], self.wait_stop[name] = [], []
        for r in requests:
            self.arrive(r)

    # -- the idle reaper (Waker.reap_once with waker.scheduling.reaper.idle_stops) -------------------------------

    def schedule_reap(self, name: str) -> None:
        if self.cfg.idle_timeout > 0:
            last_used, ready_since = self.last_used[name], self.ready_since[name]
            assert last_used is not None and ready_since is not None
            when = max(last_used + self.cfg.idle_timeout, ready_since + self.cfg.min_uptime)
            # The reaper polls every second; here it looks 1 us after the moment the model is due, so the rounding
            # of last_used + idle_timeout can't make it look a hair too early and miss it.
            self.at(when + 1e-6, partial(self._reap, name))

    def _reap(self, name: str) -> None:
        view = _IdleView(name, self.specs[name], self.state[name], self.in_flight[name], self.waiting(name),
                         self.last_used[name], self.ready_since[name])
        if idle_stops([view], self.now):
            self.stop_engine(name, idle=True)  # idle_stops checked what stop_if_idle would (READY, no work)
            self.cluster.changed(name)

    # -- after every event ------------------------------------------------------------------------------------

    def settle(self) -> None:
        self.cluster.settle()
        for name, held in self.held_back.items():
            # Gate: a held-back request looks again when its seat changes; a lifted drain lets it run.
            if held and self.state[name] is S.READY and not self.held_back_now(name):
                self.held_back[name] = []
                for r in held:
                    self.begin(r)
        # The executor's loops poll while tickets wait; here a planning event at every drain deadline (the only
        # moment a plan changes without an event: the drained model stops taking new work).
        for seat in self.cluster.seats.values():
            for deadline in seat.drains.values():
                if deadline > self.now and deadline not in self._replans:
                    self._replans.add(deadline)
                    self.at(deadline, partial(self._replans.discard, deadline))

    def audit(self) -> None:
        """Every node: the executor's ledger within its budget, and holding at least what the engines started there
        hold (reservations for multi-node starts are in the ledger, not yet in engines)."""
        ledger = dict.fromkeys(self.capacity, 0.0)
        engines = dict.fromkeys(self.capacity, 0.0)
        state, running_on = self.state, self.running_on
        for name, seat in self.cluster.seats.items():
            # The seat's own account (what ClusterAdmission.held_on reads), for the models that hold something.
            if state[name] in HOLDING:
                for node in seat.placed:
                    ledger[node] += seat.held_on(node, Hold.FULL)
                gb = self.models[name].memory_gb
                for node in running_on[name]:
                    engines[node] += gb
            elif seat.reserved:
                for node in seat.reserved:
                    ledger[node] += seat.held_on(node, Hold.NONE)
        for node, held in ledger.items():
            if held > self.node_high_water[node]:
                self.node_high_water[node] = held
                self.high_water = max(self.high_water, held)
            if held > self.capacity[node] + EPS:
                self.violation(f"node {node} holds {held:g} GB > budget {self.capacity[node]:g} GB", node)
            elif engines[node] > held + EPS:
                self.violation(f"engines on node {node} hold {engines[node]:g} GB, its ledger {held:g} GB", node)

    def violation(self, problem: str, node: str) -> None:
        if len(self.violations) < 5:
            holders = ", ".join(f"{n} {self.state[n]} {gb:g}" for n in self.models
                                if (gb := self.cluster.held_on(n).get(node)))
            self.violations.append(f"t={self.now:.1f}s {problem} ({holders})")

    def stuck(self) -> str:
        parts = []
        for n in self.models:
            where = {"held back by a drain": len(self.held_back[n]), "waiting for a stop": len(self.wait_stop[n]),
                     "waiting for a start": len(self.attached[n]), "queued": len(self.queued[n])}
            what = ", ".join(f"{k} {v}" for k, v in where.items() if v)
            if what:
                seat = self.cluster.seats[n]
                dl = f", drains {seat.drains}" if seat.drains else ""
                on = f", queued on {', '.join(seat.placed) or '?'}" if self.queued[n] else ""
                parts.append(f"{n} ({self.state[n]}, {self.in_flight[n]} in flight{dl}{on}): {what}")
        return "; ".join(parts) or "?"


# -- baselines: llama-swap's swap lock, one model or one group resident -------------------------------


class GroupSwapSim(Sim):
    """One group resident at a time; requests served in arrival order (a swap blocks everyone behind it)."""

    def __init__(self, models: Sequence[ModelDef], cfg: SimConfig, groups: Sequence[Sequence[str]],
                 policy: str) -> None:
        super().__init__(models, cfg)
        self.policy = policy
        self.groups = [list(g) for g in groups]
        self.group_of = {n: i for i, g in enumerate(self.groups) for n in g}
        self.active: int | None = None
        self.queue: deque[Request] = deque()

    def detail(self) -> str:
        if all(len(g) == 1 for g in self.groups):
            return "swap on every model change"
        return "groups " + " | ".join("+".join(g) for g in self.groups)

    def arrive(self, r: Request) -> None:
        self.queue.append(r)

    def settle(self) -> None:
        while self.queue:
            r = self.queue[0]
            group = self.group_of[r.model]
            if self.active is None:
                self.active = group
            if self.active == group:
                state = self.state[r.model]
                if state is S.STOPPED:
                    self.start_engine(r.model)
                    state = S.STARTING
                self.queue.popleft()
                if state is S.READY:
                    self.begin(r)
                else:
                    self.attached[r.model].append(r)
                continue
            members = self.groups[self.active]
            if all(self.state[n] is S.STOPPED for n in members):
                self.active = group
                continue
            busy = any(self.state[n] in (S.STARTING, S.STOPPING) or self.in_flight[n] for n in members)
            if not busy:
                for n in members:
                    if self.state[n] is S.READY:
                        self.stop_engine(n)
            return


# -- output ----------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 1000 else f"{seconds:.0f}"


def report(results: Sequence[Result], trace: Sequence[Request], models: Sequence[ModelDef], args: argparse.Namespace,
           elapsed: float) -> str:
    counts = {m.name: 0 for m in models}
    for r in trace:
        counts[r.model] += 1
    span = max((r.t for r in trace), default=0.0)
    source = args.trace or f"generated, {args.hours:g} h, seed {args.seed}"
    out = [
        f"trace: {len(trace)} requests over {span / 60:.1f} min ({source}); budget {args.budget_gb:g} GB; "
        f"models {sum(m.memory_gb for m in models):g} GB in all; stop {args.stop_s:g}s",
        "models: " + ", ".join(f"{m.name} {m.memory_gb:g} GB/{m.load_s:g}s load/{counts[m.name]} req" for m in models),
        "",
        table(
            ["policy", "answered", "cold starts", "evictions", "idle stops", "wait mean s", "wait p99 s",
             "wait max s", "latency mean s", "high-water GB", "last end"],
            [[r.policy, f"{r.answered}/{r.total}", str(r.cold_starts), str(r.evictions), str(r.idle_stops),
              fmt_s(r.wait_mean), fmt_s(r.wait_p99), fmt_s(r.wait_max), fmt_s(r.latency_mean),
              f"{r.high_water_gb:g}", f"{r.last_end / 60:.1f} min"] for r in results],
        ),
        "",
        "wait per model, mean / p99 (s):",
        table(
            ["model", *(r.policy for r in results)],
            [[m.name, *(f"{fmt_s(r.per_model[m.name]['wait_mean'])} / {fmt_s(r.per_model[m.name]['wait_p99'])}"
                        for r in results)] for m in models],
        ),
        "",
        *(f"{r.policy}: {r.detail}" for r in results),
        f"simulated in {elapsed:.2f}s",
    ]
    return "\n".join(out)


def sweep_report(runs: Sequence[Sequence[Result]], seeds: Sequence[int], traces: Sequence[Sequence[Request]],
                 args: argparse.Namespace, elapsed: float) -> str:
    policies = [r.policy for r in runs[0]]

    def cell(r: Result) -> str:
        lost = f" LOST {r.total - r.answered}" if r.answered < r.total else ""
        return f"{r.cold_starts} / {fmt_s(r.wait_mean)} / {fmt_s(r.wait_p99)} / {fmt_s(r.wait_max)}{lost}"

    per_seed = table(["seed", "requests", *policies],
                     [[str(seed), str(len(trace)), *(cell(r) for r in results)]
                      for seed, trace, results in zip(seeds, traces, runs, strict=True)])
    rows = []
    for i, policy in enumerate(policies):
        rs = [results[i] for results in runs]
        rows.append([
            policy, str(sum(r.answered < r.total for r in rs)), str(sum(r.total - r.answered for r in rs)),
            f"{mean([r.cold_starts for r in rs]):.1f}", f"{mean([r.evictions for r in rs]):.1f}",
            fmt_s(mean([r.wait_mean for r in rs])), fmt_s(percentile([r.wait_p99 for r in rs], 50)),
            fmt_s(max(r.wait_max for r in rs)), fmt_s(mean([r.latency_mean for r in rs])),
            f"{max(r.high_water_gb for r in rs):g}",
        ])
    summary = table(["policy", "runs losing requests", "requests lost", "cold starts", "evictions",
                     "wait mean s", "median p99 s", "worst wait s", "latency mean s", "high-water GB"], rows)
    return "\n".join([
        f"{len(seeds)} generated traces (seeds {seeds[0]}..{seeds[-1]}, {args.hours:g} h each); budget "
        f"{args.budget_gb:g} GB; max_hold {args.max_hold:g}s; stop {args.stop_s:g}s",
        "", "per seed: cold starts / wait mean / wait p99 / wait max (s); LOST = requests never answered",
        per_seed, "", "over all seeds (means of per-run figures; p99: median of the runs' p99):", summary,
        "", f"simulated in {elapsed:.2f}s",
    ])


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--trace", type=Path, help="CSV: t_seconds,model,duration_s (default: generated)")
    p.add_argument("--models", type=Path, help="YAML list of models (default: the DGX Spark six)")
    p.add_argument("--budget-gb", type=float, default=120.0, help="node budget: total - reserve (default 120)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated trace (default 1)")
    p.add_argument("--seeds", type=int, default=1, help="generated traces to run: seed, seed+1, ... (default 1)")
    p.add_argument("--hours", type=float, default=1.0, help="length of the generated trace (default 1)")
    p.add_argument("--max-hold", type=float, default=60.0, help="sparkgate max_hold in seconds (default 60)")
    p.add_argument("--idle-timeout", type=float, default=900.0, help="sparkgate idle stop, 0 = off (default 900)")
    p.add_argument("--min-uptime", type=float, default=60.0, help="sparkgate min_uptime (default 60)")
    p.add_argument("--stop-s", type=float, default=2.0, help="seconds an engine takes to stop (default 2)")
    p.add_argument("--load-base", type=float, default=5.0, help="load_s = base + per_gb * GB (default 5)")
    p.add_argument("--load-per-gb", type=float, default=0.5, help="(default 0.5)")
    p.add_argument("--groups", help='static-groups split, e.g. "a,b;c,d" (default: first-fit decreasing)')
    p.add_argument("--policy", action="append", choices=POLICIES, help="run only these (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    models = (read_models(args.models, args.load_base, args.load_per_gb) if args.models
              else default_models(args.load_base, args.load_per_gb))
    cfg = SimConfig(budget_gb=args.budget_gb, stop_s=args.stop_s, max_hold=args.max_hold,
                    idle_timeout=args.idle_timeout, min_uptime=args.min_uptime)
    too_big = [m.name for m in models if m.memory_gb > args.budget_gb]
    if too_big:
        raise SystemExit(f"models larger than the {args.budget_gb:g} GB budget: {too_big}")
    groups = (parse_groups(args.groups, models, args.budget_gb) if args.groups
              else first_fit_groups(models, args.budget_gb))
    sims: dict[str, Callable[[], Sim]] = {
        "sparkgate": lambda: SparkgateSim(models, cfg),
        "one-at-a-time": lambda: GroupSwapSim(models, cfg, [[m.name] for m in models], "one-at-a-time"),
        "static-groups": lambda: GroupSwapSim(models, cfg, groups, "static-groups"),
    }
    policies = args.policy or DEFAULT_POLICIES
    if args.trace:
        seeds = [args.seed]
        traces = [read_trace(args.trace, (m.name for m in models))]
    else:
        seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
        traces = [generate_trace(models, args.hours, seed) for seed in seeds]

    started = time.perf_counter()
    runs = [[sims[name]().run(trace) for name in policies] for trace in traces]
    elapsed = time.perf_counter() - started

    if args.json:
        doc = {"budget_gb": args.budget_gb, "max_hold": args.max_hold, "stop_s": args.stop_s,
               "idle_timeout": args.idle_timeout, "groups": groups,
               "models": [{"name": m.name, "memory_gb": m.memory_gb, "load_s": m.load_s} for m in models],
               "runs": [{"seed": seed, "requests": len(trace), "results": [asdict(r) for r in results]}
                        for seed, trace, results in zip(seeds, traces, runs, strict=True)],
               "elapsed_s": round(elapsed, 3)}
        print(json.dumps(doc, indent=2))
    elif len(runs) == 1:
        print(report(runs[0], traces[0], models, args, elapsed))
    else:
        print(sweep_report(runs, seeds, traces, args, elapsed))
    bad = [(seed, r.policy, v) for seed, results in zip(seeds, runs, strict=True) for r in results
           for v in r.violations]
    for seed, policy, v in bad:
        where = args.trace if args.trace else f"seed {seed}"
        print(f"INVARIANT VIOLATED [{policy}, {where}]: {v}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
