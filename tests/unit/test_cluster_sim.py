"""bench/cluster.py: the cluster simulation drives the real executor (ClusterAdmission) within every node's budget."""

import math

import pytest

from bench.cluster import (
    ClusterModel,
    ClusterResult,
    Node,
    default_models,
    default_nodes,
    simulate,
)
from bench.trace import ModelDef, Request, SimConfig, SparkgateSim, generate_trace, load_time
from waker.scheduling.budget import Budget

CFG = SimConfig(budget_gb=math.inf, stop_s=2.0, max_hold=60.0, idle_timeout=900.0, min_uptime=60.0)
NODES = default_nodes(12)
MODELS = default_models(NODES)
SEEDS = (1, 4, 5)
HOURS = 0.25  # ~1200 requests a seed; the three policies run in about a second


def _churn(r: ClusterResult) -> int:
    return r.result.cold_starts + r.result.evictions


def _default_run(seed: int, policy: str) -> ClusterResult:
    return simulate(MODELS, NODES, CFG, generate_trace([m.traffic for m in MODELS], HOURS, seed), policy)


def _model(name: str, gb: float, node: tuple[str, ...] | None = None, span: int = 1) -> ClusterModel:
    return ClusterModel(ModelDef(name, gb, load_time(gb, 5.0, 0.5)), node, (), span)


def _trace(*rows: tuple[float, str, float]) -> list[Request]:
    return [Request(i, t, m, d) for i, (t, m, d) in enumerate(rows)]


def _spark(name: str) -> Node:
    return Node(name, Budget(128, 8))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("policy", ["sparkgate", "first-fit", "static"])
def test_no_node_is_ever_over_budget_and_every_request_is_answered(seed: int, policy: str) -> None:
    run = _default_run(seed, policy)
    assert run.result.violations == []  # checked after every simulated event, on every node
    assert run.result.answered == run.result.total > 500
    for node in NODES:
        assert run.high_water[node.name] <= node.budget.capacity_gb


@pytest.mark.parametrize("seed", SEEDS)
def test_sparkgate_placement_has_no_more_cold_starts_and_evictions_than_first_fit(seed: int) -> None:
    # Failed with the earlier most-room rule (bench/CLUSTER.md, Finding 1; `sparkgate-most-room`).
    assert _churn(_default_run(seed, "sparkgate")) <= _churn(_default_run(seed, "first-fit"))


def test_cold_model_goes_to_the_empty_node_rather_than_evicting_on_a_full_one() -> None:
    nodes = [_spark("n1"), _spark("n2")]
    models = [_model("a", 70), _model("b", 70)]
    run = simulate(models, nodes, CFG, _trace((0, "a", 5), (60, "b", 5)), "sparkgate")
    assert [(m, where) for _, m, where in run.placed_log] == [("a", ("n1",)), ("b", ("n2",))]
    assert (run.result.cold_starts, run.result.evictions, run.result.answered) == (2, 0, 2)


def test_when_every_node_is_full_the_least_recently_used_model_is_evicted_wherever_it_is() -> None:
    nodes = [_spark("n1"), _spark("n2")]
    models = [_model("a", 70), _model("b", 70), _model("c", 70)]
    # a (n1) serves until t=245, b (n2) until t=46: at t=300 both are idle, b for longer.
    trace = _trace((0, "a", 200), (1, "b", 5), (300, "c", 5))
    placed = simulate(models, nodes, CFG, trace, "sparkgate")
    assert [(victim, node) for _, node, victim, _ in placed.evict_log] == [("b", "n2")]
    assert placed.placed_log[-1][1:] == ("c", ("n2",))
    first = simulate(models, nodes, CFG, trace, "first-fit")  # nothing fits: the first node, whatever it costs
    assert [(victim, node) for _, node, victim, _ in first.evict_log] == [("a", "n1")]


def test_multi_node_model_holds_its_first_node_while_the_second_makes_room() -> None:
    nodes = [_spark("n1"), _spark("n2")]
    models = [_model("x", 60, node=("n2",)), _model("big", 100, span=2), _model("y", 30, node=("n1",))]
    # x is busy on n2 until t=335 (35 s load + 300 s); big needs 100 GB on both nodes; y only fits n1.
    trace = _trace((0, "x", 300), (10, "big", 10), (20, "y", 5))
    run = simulate(models, nodes, CFG, trace, "sparkgate")
    start = {r.model: run_start for r in trace if (run_start := _start(run, r)) is not None}
    # n1 admitted big at t=10 and held 100 GB for it (y could not take it); n2 admitted it once x stopped
    # (t=335 + 2 s stop), then big loaded (5 + 50 s); y got n1 when big went idle and was evicted.
    assert start["big"] == pytest.approx(337 + 55)
    assert start["y"] == pytest.approx(402 + 2 + 20)
    assert run.high_water == {"n1": 100, "n2": 100}
    assert run.result.violations == []


def test_a_busy_model_registered_on_every_node_stops_taking_work_after_max_hold_for_a_waiter() -> None:
    # bench/CLUSTER.md's Finding 3: every node's step used to set the drain of every model registered there, so a
    # node where `hot` holds nothing lifted the drain n1 asked for and `big` waited until hot's traffic ended (over
    # 500 s). Each node now keeps its own deadline (tests/unit/scheduling/test_placement.py::
    # test_a_drain_set_by_one_node_is_not_lifted_by_another); this is the same case on the real executor.
    nodes = [_spark("n1"), _spark("n2")]
    # `fill` keeps n2 busy, so `hot` (which may run on either) is placed on n1, where `big` needs its memory.
    models = [_model("hot", 70), _model("big", 80, node=("n1",)), _model("fill", 60, node=("n2",))]
    trace = _trace((0, "fill", 900.0), *((t, "hot", 30.0) for t in range(1, 600, 10)), (100, "big", 5))
    run = simulate(models, nodes, CFG, trace, "sparkgate")
    assert run.result.answered == len(trace)
    assert [(m, where) for _, m, where in run.placed_log][:1] == [("hot", ("n1",))]
    # max_hold 60 s + the last 30 s request + stop 2 s + load 45 s
    assert _start(run, trace[-1]) - 100 == pytest.approx(60 + 30 + 2 + 45, abs=10)  # type: ignore[operator]


def test_a_drain_no_ticket_needs_any_more_is_lifted_and_the_model_takes_work_again() -> None:
    # bench/README.md, Findings 1: the executor before 17b06b3 kept a drain deadline until the model stopped, so the
    # request at t=100 was held back for ever. One node, bench/trace.py's simulation of the real executor: small
    # (15 GB) drains big; mid goes idle and is evicted instead; big's drain is lifted.
    cfg = SimConfig(budget_gb=100.0, stop_s=2.0, max_hold=60.0, idle_timeout=900.0, min_uptime=60.0)
    models = [ModelDef("big", 60, 10.0), ModelDef("mid", 30, 10.0), ModelDef("small", 15, 10.0)]
    trace = _trace((0, "big", 200), (5, "mid", 20), (20, "small", 5), (100, "big", 5))
    sim = SparkgateSim(models, cfg)
    result = sim.run(trace)
    assert (result.answered, result.evictions, result.violations) == (4, 1, [])
    assert sim.events.counts["drain"] == 1
    assert sim.served[2].start == 35 + 2 + 10  # mid's request ends, its stop, small's load
    assert sim.served[3].start == 100  # at once: big no longer drains


def _start(run: ClusterResult, r: Request) -> float | None:
    return run.served[r.id].start
