"""Cluster simulation: placement across nodes (`waker.scheduling.placement`) and per-node admission
(`waker.scheduling.plan.plan`) against two baselines, by discrete-event simulation with a fake clock.

What it measures
----------------
A cluster of nodes, each with its own memory budget and labels, and models that may run on some of them
(`node` lists, `node_labels`, or any node whose budget can hold them); a few span two nodes. A trace of
requests (arrival, model, duration) is replayed against each policy, and the script prints requests
answered / total, cold starts, evictions (stops made to free memory for another model), idle stops,
queue wait (mean / p99 / max), how often a cold model was placed, and per node the most GB held at any
instant next to its budget. After every simulated event it checks every node's held GB against its
budget, and at the end that every request was answered; a violation goes to stderr and the exit status is 1.

Method
------
The event heap, engines, requests, drains and idle reaper are bench/trace.py's (`SparkgateSim`), extended
to several nodes the way waker/scheduling/cluster.py and waker/scheduling/node.py extend one node:
- A request for a cold model that has no placement yet is placed by `waker.scheduling.placement.choose` over its
  `waker.scheduling.placement.candidates` (each node's `Snapshot` as its `NodeAdmission` would build it: models
  registered there, what each holds in that node's ledger, the node's FIFO queue).
- Its ticket then queues on the first of its placed nodes in settings order that has not admitted it yet,
  and that node's `plan` admits it, evicts for it or drains for it. A model spanning N nodes, once admitted
  by a node, holds that node's share as STARTING (`ModelController.reserved`) and its waiters queue on the
  next node (a fresh ticket); when every node has admitted it, it starts. One controller per model: a stop
  decided by one node's plan stops it on all its nodes, and a stopped model is placed afresh next time.
- After every event every node with a ticket is planned, in settings order, until a pass admits nothing.
  Drains: each node's plan says which of its models must drain; a model's deadline is the earliest any
  of its nodes asks for (absent = lifted), as waker/scheduling/node.py does since bench/CLUSTER.md's Finding 3.
  `--policy sparkgate-shared-drains` simulates the earlier behaviour, where every node's step overwrote the
  deadline of every model registered there (the last candidate node wins).
- Idle reaper (idle_timeout, min_uptime) and max_hold as in bench/trace.py. Load time 5 s + 0.5 s/GB,
  stop 2 s; a request holds its model for its duration; nobody gives up waiting.

Policies
--------
sparkgate  `waker.scheduling.placement.choose`: where it fits now, keeping room for models that may run only there,
           tightest fit first; else fewest / least valuable victims; ties to the node listed first.
first-fit  the first candidate nodes (settings order) where it fits now after the node's queue; if fewer
           fit, the first other candidates. No scoring; admission is still `plan` per node.
static     every model pinned up front to one node (a multi-node model to a fixed set), by first-fit
           decreasing bin packing over its candidates (the node with most room left when none has room):
           like a hand-written models.d per machine, each machine running its own sparkgate.
sparkgate-most-room and sparkgate-shared-drains (only with --policy): the rules before bench/CLUSTER.md's
           Findings 1 and 3, kept as regression checks.

    .venv/bin/python bench/cluster.py                  # 12 nodes, 30 models, 1 h, seed 1 (a few seconds)
    .venv/bin/python bench/cluster.py --seeds 20       # per-seed table and summary
    .venv/bin/python bench/cluster.py --trace t.csv --json
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trace import (
    EPS,
    ModelDef,
    Request,
    Result,
    Served,
    SimConfig,
    SparkgateSim,
    fmt_s,
    generate_trace,
    load_time,
    mean,
    percentile,
    read_trace,
    table,
)
from waker.config.spec import ModelSpec
from waker.scheduling.budget import Budget
from waker.scheduling.placement import FITS, candidates, choose, score
from waker.scheduling.plan import ModelView, Snapshot, Ticket, held_gb, plan
from waker.state import HOLDING, ModelState

S = ModelState
POLICIES = ("sparkgate", "first-fit", "static", "sparkgate-most-room", "sparkgate-shared-drains")
DEFAULT_POLICIES = POLICIES[:3]


# -- scenario --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    budget: Budget
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterModel:
    traffic: ModelDef  # name, memory_gb (per node), load_s, traffic pattern
    node: tuple[str, ...] | None = None  # may run only on these
    node_labels: tuple[tuple[str, str], ...] = ()
    nodes: int = 1  # spans this many nodes

    @property
    def name(self) -> str:
        return self.traffic.name

    def spec(self) -> ModelSpec:
        """The models.d entry that `waker.scheduling.placement.candidates` reads."""
        return ModelSpec(name=self.name, engine="vllm", runtime="docker", image="sim", model="sim",
                         memory_gb=self.traffic.memory_gb, node=self.node, node_labels=dict(self.node_labels),
                         nodes=self.nodes)


SPARK = (("gpu", "gb10"), ("arch", "arm64"))
BOX = (("gpu", "rtx"), ("arch", "x86_64"))


def default_nodes(count: int = 12) -> list[Node]:
    """Two thirds DGX Sparks (128 GB - 8 reserve = 120 GB), the rest smaller 64 GB boxes (60 GB)."""
    sparks = max(2, min(count, round(count * 2 / 3)))
    return ([Node(f"spark-{i}", Budget(128, 8), SPARK) for i in range(1, sparks + 1)]
            + [Node(f"box-{i}", Budget(64, 4), BOX) for i in range(1, count - sparks + 1)])


def default_models(nodes: Sequence[Node], base: float = 5.0, per_gb: float = 0.5) -> list[ClusterModel]:
    names = [n.name for n in nodes]
    boxes = [n for n in names if n.startswith("box-")] or names[-1:]
    sparks = [n for n in names if n.startswith("spark-")]

    def m(name: str, gb: float, rate: float, duration: float, *, bursts: float = 0.0, burst_len: float = 300.0,
          node: Sequence[str] | None = None, labels: tuple[tuple[str, str], ...] = (), span: int = 1) -> ClusterModel:
        traffic = ModelDef(name, gb, load_time(gb, base, per_gb), pattern="bursts" if bursts else "poisson",
                           rate_per_hour=rate, mean_duration_s=duration, bursts_per_hour=bursts or 4.0,
                           burst_len_s=burst_len)
        return ClusterModel(traffic, tuple(node) if node else None, labels, span)

    gb10 = (("gpu", "gb10"),)
    rtx = (("gpu", "rtx"),)
    return [
        # big: only Sparks can hold them (by size, or by label)
        m("gpt-oss-120b", 70, 24, 30, bursts=4, burst_len=180),
        m("glm-4.5-air", 60, 60, 30, bursts=3, burst_len=300, labels=gb10),
        m("qwen2.5-vl-72b", 65, 40, 25, bursts=2, burst_len=300, labels=gb10),
        m("deepseek-r1-70b", 70, 30, 60, bursts=2, burst_len=600),
        m("llama-3.3-70b", 70, 60, 20, bursts=2, burst_len=300, labels=gb10),
        m("minimax-m2", 65, 30, 40, bursts=2, burst_len=600, labels=gb10),
        m("qwen3-next-80b", 50, 100, 10, bursts=3, burst_len=400),
        m("qwen3-coder-30b", 35, 500, 4),
        m("nemotron-49b", 50, 60, 15),
        m("granite-34b", 35, 20, 10),
        m("qwen3-32b", 35, 200, 8),
        m("gemma3-27b", 30, 120, 8, bursts=3, burst_len=300),
        m("gpt-oss-20b", 16, 360, 10, bursts=6, burst_len=300),
        m("codestral-22b", 25, 150, 5, bursts=3, burst_len=300),
        m("mistral-small-24b", 25, 150, 6),
        m("vision-11b", 22, 50, 8),
        m("qwen3-14b", 12, 200, 6, bursts=4, burst_len=300),
        m("sql-coder-15b", 12, 60, 6, bursts=2, burst_len=300),
        m("llama-8b", 10, 120, 5),
        m("qwen3-8b", 9, 200, 4),
        m("moderation-8b", 9, 250, 0.5, labels=rtx),
        m("phi-4", 8, 60, 5),
        m("translate-7b", 8, 80, 3, labels=rtx),
        m("small-utility", 6, 400, 1.5),
        m("whisper-large", 6, 100, 10, node=boxes[-1:]),
        m("reranker", 4, 400, 0.5, node=boxes[:3]),
        m("llama-3b", 4, 300, 1),
        m("embed-e5", 3, 300, 0.3),
        m("embed-bge", 2, 900, 0.3, node=boxes[:2]),
        # spanning two nodes (memory_gb per node)
        m("llama-405b", 100, 20, 60, bursts=2, burst_len=600, labels=gb10, span=2),
        m("qwen3-235b", 90, 40, 30, bursts=3, burst_len=300, labels=gb10, span=2),
        m("mixtral-8x22b", 60, 30, 20, bursts=2, burst_len=300, node=sparks[len(sparks) // 2:], span=2),
    ]


# -- placement policies -------------------------------------------------------------------------------------


Placer = Callable[[str, float, int, Sequence[str], Mapping[str, Snapshot], Mapping[str, float]],
                  tuple[str, ...] | None]


def first_fit(model: str, need_gb: float, count: int, nodes: Sequence[str], snapshots: Mapping[str, Snapshot],
              exclusive_gb: Mapping[str, float]) -> tuple[str, ...] | None:
    """The first `count` nodes where `model` fits now (after the node's queue), filled up with the first others."""
    def free(snap: Snapshot) -> float:
        return snap.capacity_gb - snap.held_gb - sum(t.need_gb for t in snap.queue if t.model != model)

    fits = [n for n in nodes if need_gb <= free(snapshots[n]) + EPS]
    chosen = (fits + [n for n in nodes if n not in fits])[:count]
    return tuple(chosen) if len(chosen) == count else None


def most_room(model: str, need_gb: float, count: int, nodes: Sequence[str], snapshots: Mapping[str, Snapshot],
              exclusive_gb: Mapping[str, float]) -> tuple[str, ...] | None:
    """The placement rule before bench/CLUSTER.md's Finding 1 (a regression check): among nodes where it fits
    now, the one with the MOST room left, and no room kept for models that may run only there."""
    scored = []
    for i, n in enumerate(nodes):
        s = score(snapshots[n], model, need_gb, i)
        if s is not None:
            scored.append((replace(s, room_gb=-s.room_gb) if s.tier == FITS else s, n))
    if len(scored) < count:
        return None
    return tuple(n for _, n in sorted(scored)[:count])


def static_assignment(models: Sequence[ClusterModel], allowed: Mapping[str, tuple[str, ...]],
                      capacity: Mapping[str, float]) -> dict[str, tuple[str, ...]]:
    """First-fit decreasing: the largest model first, onto the first allowed node(s) with room left; where
    none has room, onto the allowed node(s) with the most room left (that node's scheduler then evicts)."""
    room = dict(capacity)
    order = list(capacity)
    fixed: dict[str, tuple[str, ...]] = {}
    for m in sorted(models, key=lambda m: (-m.traffic.memory_gb, -m.nodes, m.name)):
        gb, ok = m.traffic.memory_gb, allowed[m.name]
        pick = [n for n in ok if room[n] >= gb - EPS][:m.nodes]
        if len(pick) < m.nodes:
            pick += sorted((n for n in ok if n not in pick), key=lambda n: -room[n])[:m.nodes - len(pick)]
        for n in pick:
            room[n] -= gb
        fixed[m.name] = tuple(sorted(pick, key=order.index))
    return fixed


# -- the simulation ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ClusterResult:
    result: Result
    high_water: dict[str, float]  # node -> most GB held at any instant
    placements: int  # placement decisions (cold model with more candidates than nodes it spans)
    placed_log: list[tuple[float, str, tuple[str, ...]]] = field(default_factory=list)
    evict_log: list[tuple[float, str, str, str]] = field(default_factory=list)
    served: dict[int, Served] = field(default_factory=dict)  # request id -> start, end


class ClusterSim(SparkgateSim):
    """bench/trace.py's SparkgateSim on several nodes: one ledger, queue and `plan` per node, placement on
    cold start, reservations for multi-node models. One ticket per model, on the node admitting it now."""

    def __init__(self, models: Sequence[ClusterModel], nodes: Sequence[Node], cfg: SimConfig, policy: str) -> None:
        super().__init__([m.traffic for m in models], cfg)
        self.policy = policy
        self.shared_drains = policy == "sparkgate-shared-drains"
        self.order = [n.name for n in nodes]
        self.capacity = {n.name: n.budget.capacity_gb for n in nodes}
        budgets = {n.name: n.budget for n in nodes}
        labels = {n.name: dict(n.labels) for n in nodes}
        self.span = {m.name: m.nodes for m in models}
        allowed = {m.name: candidates(m.spec(), budgets, labels) for m in models}
        unplaceable = [m for m, c in allowed.items() if len(c) < self.span[m]]
        if unplaceable:
            raise SystemExit(f"models with fewer candidate nodes than they span: {unplaceable}")
        self.candidates = static_assignment(models, allowed, self.capacity) if policy == "static" else allowed
        self.placer: Placer = {"first-fit": first_fit, "sparkgate-most-room": most_room}.get(policy, choose)
        self.registered = {n: [m for m in self.models if n in self.candidates[m]] for n in self.order}
        # ModelController.placed / reserved; placed is fixed where there is no choice (as in the controller).
        self.placed = {m: c if len(c) == self.span[m] else () for m, c in self.candidates.items()}
        self.reserved: dict[str, set[str]] = {m: set() for m in self.models}
        self.ticket_node: dict[str, str] = {}
        self.node_drains: dict[str, dict[str, float]] = {n: {} for n in self.order}  # each node's last plan
        self.node_high_water = dict.fromkeys(self.order, 0.0)
        self.placements = 0
        self.placed_log: list[tuple[float, str, tuple[str, ...]]] = []
        self.evict_log: list[tuple[float, str, str, str]] = []  # (t, node, victim, reason)

    def detail(self) -> str:
        drains = "every node overwrites a model's drain (admission.py)" if self.shared_drains else "per-node drains"
        return f"{super().detail()}, {drains}"

    # ledgers
    def held_on(self, name: str, node: str) -> float:
        """admission._held: a reserved node holds the full share; else what its state holds where placed."""
        m = self.models[name]
        if node in self.reserved[name]:
            return m.memory_gb
        if node not in self.placed[name]:
            return 0.0
        return held_gb(self.state[name], m.memory_gb, m.sleeping_gb)

    def node_loads(self) -> dict[str, float]:
        loads = dict.fromkeys(self.order, 0.0)
        for name in self.models:
            if self.reserved[name] or self.state[name] in HOLDING:
                for node in self.placed[name]:
                    loads[node] += self.held_on(name, node)
        return loads

    def held(self) -> float:
        return max(self.node_loads().values())

    def audit(self) -> None:
        for node, held in self.node_loads().items():
            self.node_high_water[node] = max(self.node_high_water[node], held)
            self.high_water = max(self.high_water, held)
            if held > self.capacity[node] + EPS and len(self.violations) < 5:
                holders = ", ".join(f"{n} {self.state[n]} {self.held_on(n, node):g}" for n in self.registered[node]
                                    if self.held_on(n, node))
                self.violations.append(f"t={self.now:.1f}s node {node} holds {held:g} GB > budget "
                                       f"{self.capacity[node]:g} GB ({holders})")

    def snapshot(self, node: str | None = None) -> Snapshot:  # type: ignore[override]
        assert node is not None
        models = {}
        for n in self.registered[node]:
            m = self.models[n]
            state = S.STARTING if node in self.reserved[n] and self.state[n] in (S.STOPPED, S.FAILED) else self.state[n]
            models[n] = ModelView(
                name=n, state=state, footprint_gb=m.memory_gb, held_gb=self.held_on(n, node),
                in_flight=self.in_flight[n], waiting=0 if self.holding_back(n) else self.waiting(n),
                last_used=self.last_used[n], pinned=m.pinned, priority=m.priority,
            )
        queue = tuple(Ticket(n, t.since, self.models[n].memory_gb) for n, t in self.tickets.items()
                      if self.ticket_node[n] == node and t.requests)
        return Snapshot(now=self.now, capacity_gb=self.capacity[node], models=models, queue=queue,
                        live_free_gb=None, max_hold=self.cfg.max_hold)

    # ClusterAdmission.admit / _place
    def enqueue(self, name: str, requests: list[Request]) -> None:
        if not self.placed[name] and not self.place(name, requests):
            return
        ticket = self.tickets.get(name)
        if ticket is None:
            super().enqueue(name, requests)
            self.ticket_node[name] = next(n for n in self.order
                                          if n in self.placed[name] and n not in self.reserved[name])
        else:
            ticket.requests.extend(requests)

    def exclusive_gb(self, node: str, excluding: str) -> float:
        """NodeAdmission.exclusive_gb: memory of the models that may run only on `node` and hold none there."""
        return sum(self.models[m].memory_gb for m in self.registered[node]
                   if m != excluding and len(self.candidates[m]) == self.span[m] and self.held_on(m, node) == 0)

    def place(self, name: str, requests: list[Request]) -> bool:
        cands = self.candidates[name]
        snapshots = {n: self.snapshot(n) for n in cands}
        nodes = self.placer(name, self.models[name].memory_gb, self.span[name], cands, snapshots,
                            {n: self.exclusive_gb(n, name) for n in cands})
        if nodes is None:
            for r in requests:
                self.served[r.id].rejected = f"{name}: no node could ever hold it"
            return False
        self.placed[name] = nodes
        self.reserved[name].clear()
        self.placements += 1
        self.placed_log.append((self.now, name, nodes))
        return True

    def admitted(self, name: str, node: str, requests: list[Request]) -> None:
        """ModelController.admitted: start, or hold this node's share until every node has admitted it."""
        if len(self.placed[name]) > 1:
            self.reserved[name].add(node)
            if not self.reserved[name].issuperset(self.placed[name]):
                self.enqueue(name, requests)  # the callers go on to the next node (a fresh ticket there)
                return
            self.reserved[name].clear()
        self.start_engine(name)
        self.attached[name].extend(requests)

    def stopped(self, name: str) -> None:
        # ModelController._transition(STOPPED) unplaces it before its waiters queue again.
        self.reserved[name].clear()
        if len(self.candidates[name]) > self.span[name]:
            self.placed[name] = ()
        super().stopped(name)

    # NodeAdmission.step, for every node with a ticket, until nothing more is admitted
    def settle(self) -> None:
        progress = True
        while progress:
            progress = False
            for node in self.order:
                if any(self.ticket_node[n] == node for n in self.tickets):
                    progress |= self.step(node)
                elif self.node_drains[node] or (self.shared_drains and self.drain_deadline):
                    self.apply_drains(node, {})

    def step(self, node: str) -> bool:
        decided = plan(self.snapshot(node))
        progress = False
        for name, why in decided.impossible.items():
            for r in self.tickets.pop(name).requests:
                self.served[r.id].rejected = why
        for name in decided.admit:
            self.admitted(name, node, self.tickets.pop(name).requests)
            progress = True
        for name, _reason in decided.stop:
            # ModelController.stop_if_idle: a request that took the model since the snapshot wins.
            if (self.state[name] is S.READY and not self.in_flight[name]
                    and (not self.waiting(name) or self.holding_back(name))):
                self.stop_engine(name)
                self.evict_log.append((self.now, node, name, _reason))
        self.apply_drains(node, dict(decided.drain))
        return progress

    def apply_drains(self, node: str, drains: dict[str, float]) -> None:
        self.node_drains[node] = drains
        for name in self.registered[node]:
            if self.shared_drains:  # admission.py: this node's step sets every registered model's deadline
                deadline = drains.get(name)
            else:  # the earliest any of its nodes asks for
                deadline = min((d for n in self.candidates[name] if (d := self.node_drains[n].get(name)) is not None),
                               default=None)
            self.set_drain(name, deadline)

    def stuck(self) -> str:
        where = {n: f" queued on {self.ticket_node[n]}" for n in self.tickets}
        return super().stuck() + "; " + ", ".join(f"{n}{w}" for n, w in where.items())

    def run_cluster(self, trace: Sequence[Request]) -> ClusterResult:
        return ClusterResult(self.run(trace), dict(self.node_high_water), self.placements, self.placed_log,
                             self.evict_log, self.served)


def simulate(models: Sequence[ClusterModel], nodes: Sequence[Node], cfg: SimConfig, trace: Sequence[Request],
             policy: str) -> ClusterResult:
    return ClusterSim(models, nodes, cfg, policy).run_cluster(trace)


# -- output -----------------------------------------------------------------------------------------------


def report(results: Sequence[ClusterResult], trace: Sequence[Request], models: Sequence[ClusterModel],
           nodes: Sequence[Node], source: str, elapsed: float) -> str:
    span = max((r.t for r in trace), default=0.0)
    total_gb = sum(m.traffic.memory_gb * m.nodes for m in models)
    capacity = sum(n.budget.capacity_gb for n in nodes)
    rs = [c.result for c in results]
    head = table(
        ["policy", "answered", "cold starts", "evictions", "cold+evict", "idle stops", "placements",
         "wait mean s", "wait p99 s", "wait max s"],
        [[r.policy, f"{r.answered}/{r.total}", str(r.cold_starts), str(r.evictions), str(r.cold_starts + r.evictions),
          str(r.idle_stops), str(c.placements), fmt_s(r.wait_mean), fmt_s(r.wait_p99), fmt_s(r.wait_max)]
         for c, r in zip(results, rs, strict=True)],
    )
    per_node = table(
        ["node", "budget GB", *(f"{r.policy} high-water" for r in rs)],
        [[n.name, f"{n.budget.capacity_gb:g}", *(f"{c.high_water[n.name]:g}" for c in results)] for n in nodes],
    )
    return "\n".join([
        f"trace: {len(trace)} requests over {span / 60:.1f} min ({source}); {len(nodes)} nodes, {capacity:g} GB "
        f"of budgets; {len(models)} models, {total_gb:g} GB if all ran at once",
        "", head, "", "per node, most GB held at any instant:", per_node, "",
        *(f"{r.policy}: {r.detail}" for r in rs),
        f"simulated in {elapsed:.2f}s",
    ])


def sweep_report(runs: Sequence[Sequence[ClusterResult]], seeds: Sequence[int], traces: Sequence[Sequence[Request]],
                 nodes: Sequence[Node], hours: float, elapsed: float) -> str:
    policies = [c.result.policy for c in runs[0]]

    def cell(r: Result) -> str:
        lost = f" LOST {r.total - r.answered}" if r.answered < r.total else ""
        return f"{r.cold_starts} / {r.evictions} / {fmt_s(r.wait_mean)} / {fmt_s(r.wait_p99)}{lost}"

    per_seed = table(["seed", "requests", *policies],
                     [[str(seed), str(len(trace)), *(cell(c.result) for c in results)]
                      for seed, trace, results in zip(seeds, traces, runs, strict=True)])
    base = {c.result.policy: i for i, c in enumerate(runs[0])}.get("first-fit")
    rows = []
    for i, policy in enumerate(policies):
        rs = [results[i].result for results in runs]
        over = sum(any(results[i].high_water[n.name] > n.budget.capacity_gb + EPS for n in nodes) for results in runs)
        churn = [r.cold_starts + r.evictions for r in rs]
        if base is None:
            vs = "-"
        else:
            ff = [results[base].result.cold_starts + results[base].result.evictions for results in runs]
            vs = f"{sum(c <= f for c, f in zip(churn, ff, strict=True))}/{len(runs)}"
        rows.append([
            policy, str(sum(r.answered < r.total for r in rs)), str(over),
            f"{mean([r.cold_starts for r in rs]):.1f}", f"{mean([r.evictions for r in rs]):.1f}",
            f"{mean(churn):.1f}", vs, fmt_s(mean([r.wait_mean for r in rs])),
            fmt_s(percentile([r.wait_p99 for r in rs], 50)), fmt_s(max(r.wait_max for r in rs)),
        ])
    summary = table(["policy", "runs losing requests", "runs over budget", "cold starts", "evictions", "cold+evict",
                     "seeds <= first-fit", "wait mean s", "median p99 s", "worst wait s"], rows)
    return "\n".join([
        f"{len(seeds)} generated traces (seeds {seeds[0]}..{seeds[-1]}, {hours:g} h each); {len(nodes)} nodes",
        "", "per seed: cold starts / evictions / wait mean / wait p99 (s); LOST = requests never answered",
        per_seed, "", "over all seeds (means of per-run figures; p99: median of the runs' p99; "
        "seeds <= first-fit: runs with no more cold starts + evictions than first-fit):", summary,
        "", f"simulated in {elapsed:.2f}s",
    ])


# -- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--trace", type=Path, help="CSV: t_seconds,model,duration_s (default: generated)")
    p.add_argument("--nodes", type=int, default=12, help="nodes: 2/3 Sparks (120 GB), the rest 60 GB (default 12)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated trace (default 1)")
    p.add_argument("--seeds", type=int, default=1, help="generated traces to run: seed, seed+1, ... (default 1)")
    p.add_argument("--hours", type=float, default=1.0, help="length of the generated trace (default 1)")
    p.add_argument("--max-hold", type=float, default=60.0, help="max_hold in seconds (default 60)")
    p.add_argument("--idle-timeout", type=float, default=900.0, help="idle stop, 0 = off (default 900)")
    p.add_argument("--min-uptime", type=float, default=60.0, help="min_uptime (default 60)")
    p.add_argument("--stop-s", type=float, default=2.0, help="seconds an engine takes to stop (default 2)")
    p.add_argument("--load-base", type=float, default=5.0, help="load_s = base + per_gb * GB (default 5)")
    p.add_argument("--load-per-gb", type=float, default=0.5, help="(default 0.5)")
    p.add_argument("--policy", action="append", choices=POLICIES, help="run only these (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> SimConfig:
    # budget_gb is per node here (ClusterSim.capacity); SparkgateSim's single budget is unused.
    return SimConfig(budget_gb=math.inf, stop_s=args.stop_s, max_hold=args.max_hold,
                     idle_timeout=args.idle_timeout, min_uptime=args.min_uptime)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nodes < 3:
        raise SystemExit("--nodes: at least 3 (2 Sparks for the models spanning two nodes, 1 box)")
    nodes = default_nodes(args.nodes)
    models = default_models(nodes, args.load_base, args.load_per_gb)
    cfg = config(args)
    policies = args.policy or list(DEFAULT_POLICIES)
    if args.trace:
        seeds = [args.seed]
        traces = [read_trace(args.trace, (m.name for m in models))]
    else:
        seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
        traces = [generate_trace([m.traffic for m in models], args.hours, seed) for seed in seeds]

    started = time.perf_counter()
    runs = [[simulate(models, nodes, cfg, trace, p) for p in policies] for trace in traces]
    elapsed = time.perf_counter() - started

    if args.json:
        doc: dict[str, Any] = {
            "nodes": [{"name": n.name, "budget_gb": n.budget.capacity_gb, "labels": dict(n.labels)} for n in nodes],
            "models": [{"name": m.name, "memory_gb": m.traffic.memory_gb, "nodes": m.nodes, "load_s": m.traffic.load_s,
                        "node": m.node, "node_labels": dict(m.node_labels)} for m in models],
            "max_hold": args.max_hold, "idle_timeout": args.idle_timeout, "stop_s": args.stop_s,
            "runs": [{"seed": seed, "requests": len(trace),
                      "results": [{**asdict(c.result), "node_high_water_gb": c.high_water,
                                   "placements": c.placements} for c in results]}
                     for seed, trace, results in zip(seeds, traces, runs, strict=True)],
            "elapsed_s": round(elapsed, 3),
        }
        print(json.dumps(doc, indent=2))
    elif len(runs) == 1:
        source = str(args.trace) if args.trace else f"generated, {args.hours:g} h, seed {args.seed}"
        print(report(runs[0], traces[0], models, nodes, source, elapsed))
    else:
        print(sweep_report(runs, seeds, traces, nodes, args.hours, elapsed))
    bad = [(seed, c.result.policy, v) for seed, results in zip(seeds, runs, strict=True) for c in results
           for v in c.result.violations]
    for seed, policy, v in bad:
        where = args.trace if args.trace else f"seed {seed}"
        print(f"INVARIANT VIOLATED [{policy}, {where}]: {v}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
