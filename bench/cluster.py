"""Cluster simulation: placement across nodes and per-node admission, as the waker's executor
(`waker.scheduling.cluster.ClusterAdmission`) does them, against two baselines, by discrete-event simulation
with a fake clock.

What it measures
----------------
A cluster of nodes, each with its own memory budget and labels, and models that may run on some of them
(`node` lists, `node_labels`, or any node whose budget can hold them); a few span two nodes. A trace of
requests (arrival, model, duration) is replayed against each policy, and the script prints requests
answered / total, cold starts, evictions (stops made to free memory for another model), idle stops,
queue wait (mean / p99 / max), how often a cold model was placed, and per node the most GB held at any
instant next to its budget. After every simulated event it checks every node's ledger against its
budget (and that the engines started on a node never hold more than its ledger says), and at the end that
every request was answered; a violation goes to stderr and the exit status is 1.

Method
------
bench/trace.py's `SparkgateSim` with one `Budget` per node: the real `ClusterAdmission` (seats, each node's
`NodeAdmission` and `plan`, placement, reservations for multi-node models in settings order, drains per
node) acting through `Effects` over simulated engines, and requests through a simulation of the gate.
Each model is registered on its `waker.scheduling.placement.candidates` (spec from `node`, `node_labels`,
`nodes`, `memory_gb`); a cold one is placed by the policy's placer (ClusterAdmission's `placer` argument)
when its first request queues. Idle reaper (`waker.scheduling.reaper.idle_stops`), max_hold, load time
5 s + 0.5 s/GB, stop 2 s, a request holds its model for its duration, nobody gives up: as bench/trace.py.

Policies
--------
sparkgate  `waker.scheduling.placement.choose`: where it fits now, keeping room for models that may run only there,
           tightest fit first; else fewest / least valuable victims; ties to the node listed first.
first-fit  the first candidate nodes (settings order) where it fits now after the node's queue; if fewer
           fit, the first other candidates. No scoring; admission is still the executor's, per node.
static     every model registered up front on one node only (a multi-node model on a fixed set), by first-fit
           decreasing bin packing over its candidates (the node with most room left when none has room):
           like a hand-written models.d per machine, each machine running its own sparkgate.
sparkgate-most-room (only with --policy): the placement rule before bench/CLUSTER.md's Finding 1 (the most
           room left among nodes where it fits, no room kept for models restricted to a node), kept as a
           regression check. (`sparkgate-shared-drains`, a copy of the executor before Finding 3 was fixed,
           was dropped when the simulation moved onto the real executor: bench/CLUSTER.md.)

    .venv/bin/python bench/cluster.py                  # 12 nodes, 32 models, 1 h, seed 1 (a few seconds)
    .venv/bin/python bench/cluster.py --seeds 20       # per-seed table and summary
    .venv/bin/python bench/cluster.py --trace t.csv --json
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
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
from waker.scheduling.cluster import Placer
from waker.scheduling.placement import FITS, candidates, choose, score
from waker.scheduling.plan import Snapshot

POLICIES = ("sparkgate", "first-fit", "static", "sparkgate-most-room")
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


PLACERS: dict[str, Placer] = {"sparkgate": choose, "first-fit": first_fit, "static": choose,
                              "sparkgate-most-room": most_room}


def simulate(models: Sequence[ClusterModel], nodes: Sequence[Node], cfg: SimConfig, trace: Sequence[Request],
             policy: str) -> ClusterResult:
    """bench/trace.py's SparkgateSim (the waker's ClusterAdmission over simulated engines) on `nodes`, each model
    registered on its `placement.candidates` (static: on the node(s) assigned up front), placed by `policy`'s placer."""
    budgets = {n.name: n.budget for n in nodes}
    labels = {n.name: dict(n.labels) for n in nodes}
    span = {m.name: m.nodes for m in models}
    allowed = {m.name: candidates(m.spec(), budgets, labels) for m in models}
    unplaceable = [m for m, c in allowed.items() if len(c) < span[m]]
    if unplaceable:
        raise SystemExit(f"models with fewer candidate nodes than they span: {unplaceable}")
    if policy == "static":
        allowed = static_assignment(models, allowed, {n.name: n.budget.capacity_gb for n in nodes})
    sim = SparkgateSim([m.traffic for m in models], cfg, budgets=budgets, candidates=allowed, span=span,
                       placer=PLACERS[policy], policy=policy)
    result = sim.run(trace)
    return ClusterResult(result, dict(sim.node_high_water), sim.events.counts["placed"], sim.events.placed,
                         sim.events.evicted, sim.served)


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
    # budget_gb is per node here (each Node's Budget); SparkgateSim's single-node budget is unused.
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
