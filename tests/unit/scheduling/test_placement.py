"""Placement across nodes: the pure scoring (`waker.scheduling.placement`) and the cluster admission inside the
waker (fake runtime, fake clock): where cold models go, independent budgets, models spanning two nodes."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import ConfigError, Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.scheduling.placement import EVICT_IDLE, FITS, candidates, choose, placement_problems, score
from waker.scheduling.plan import ModelView, Snapshot, Ticket
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "runtime": "docker", "image": "img", "engine": "generic",
                                     "memory_gb": gb, "min_uptime": 0, **fields})


def view(name: str, gb: float, *, state: ModelState = S.READY, in_flight: int = 0, last_used: float = 0.0,
         priority: int = 0, pinned: bool = False) -> ModelView:
    held = gb if state in (S.READY, S.STARTING, S.WAKING, S.STOPPING) else 0.0
    return ModelView(name, state, gb, held, in_flight=in_flight, last_used=last_used, priority=priority,
                     pinned=pinned)


def snap(capacity: float, *models: ModelView, queue: tuple[Ticket, ...] = (), live: float | None = None) -> Snapshot:
    return Snapshot(now=100.0, capacity_gb=capacity, models={m.name: m for m in models}, queue=queue,
                    live_free_gb=live)


# -- pure scoring ------------------------------------------------------------------------------------


def test_a_node_where_it_fits_beats_one_where_something_must_stop() -> None:
    snaps = {"a": snap(100, view("x", 80)), "b": snap(50)}
    assert choose("new", 40, 1, ["a", "b"], snaps) == ("b",)
    assert score(snaps["a"], "new", 40, 0).tier == EVICT_IDLE  # type: ignore[union-attr]
    assert score(snaps["b"], "new", 40, 1).tier == FITS  # type: ignore[union-attr]


def test_among_nodes_where_it_fits_the_tightest_fit_wins_ties_go_to_settings_order() -> None:
    # Best fit: a small model fills a partly used node and leaves whole nodes free for big ones.
    snaps = {"a": snap(100, view("x", 50)), "b": snap(100, view("y", 20)), "c": snap(100, view("z", 20))}
    assert choose("new", 10, 1, ["a", "b", "c"], snaps) == ("a",)
    assert choose("new", 10, 1, ["c", "b", "a"], snaps) == ("a",)
    assert choose("new", 60, 1, ["a", "b", "c"], snaps) == ("b",)
    assert choose("new", 60, 1, ["c", "b", "a"], snaps) == ("c",)


def test_room_kept_for_models_that_may_run_only_there_beats_a_tighter_fit() -> None:
    snaps = {"a": snap(100, view("x", 30)), "b": snap(100)}
    assert choose("new", 40, 1, ["a", "b"], snaps) == ("a",)
    # A stopped 50 GB model may run only on a: taking 40 of a's 70 free GB would crowd it out.
    assert choose("new", 40, 1, ["a", "b"], snaps, {"a": 50.0}) == ("b",)
    assert choose("new", 10, 1, ["a", "b"], snaps, {"a": 50.0}) == ("a",)  # 10 GB still leave it room


def test_queued_requests_on_a_node_claim_its_room_first() -> None:
    snaps = {"a": snap(100, queue=(Ticket("other", 1.0, 90),)), "b": snap(60)}
    assert choose("new", 40, 1, ["a", "b"], snaps) == ("b",)


def test_live_free_memory_counts_like_on_one_node() -> None:
    snaps = {"a": snap(100, live=10.0), "b": snap(80)}
    assert choose("new", 40, 1, ["a", "b"], snaps) == ("b",)


def test_fewest_then_least_valuable_victims() -> None:
    two_small = snap(100, view("s1", 45), view("s2", 45))
    one_big = snap(100, view("big", 90))
    assert choose("new", 60, 1, ["a", "b"], {"a": two_small, "b": one_big}) == ("b",)
    important = snap(100, view("vip", 90, priority=5, last_used=1.0))
    recent = snap(100, view("hot", 90, last_used=99.0))
    stale = snap(100, view("old", 90, last_used=10.0))
    assert choose("new", 60, 1, ["a", "b", "c"], {"a": important, "b": recent, "c": stale}) == ("c",)
    assert choose("new", 60, 1, ["a", "b"], {"a": important, "b": recent}) == ("b",)


def test_idle_victims_beat_draining_busy_ones_and_pinned_memory_rules_a_node_out() -> None:
    busy = snap(100, view("busy", 90, in_flight=2))
    idle = snap(100, view("idle", 90, last_used=99.0, priority=3))
    pinned = snap(100, view("pin", 90, pinned=True))
    assert choose("new", 60, 1, ["a", "b", "c"], {"a": busy, "b": idle, "c": pinned}) == ("b",)
    assert score(pinned, "new", 60, 2) is None
    assert choose("new", 60, 1, ["c"], {"c": pinned}) is None


def test_a_model_spanning_two_nodes_takes_the_two_best() -> None:
    snaps = {"a": snap(100, view("x", 90)), "b": snap(100), "c": snap(100, view("y", 10))}
    assert choose("g", 50, 2, ["a", "b", "c"], snaps) == ("c", "b")  # best first: c is the head
    assert choose("g", 50, 4, ["a", "b", "c"], snaps) is None


# -- candidates and config errors --------------------------------------------------------------------

BUDGETS = {"spark1": Budget(128, 8), "spark2": Budget(128, 8), "small": Budget(32, 4)}
LABELS = {"spark1": {"gpu": "gb10"}, "spark2": {"gpu": "gb10"}, "small": {"gpu": "none"}}


def test_candidates_follow_names_labels_and_size() -> None:
    assert candidates(spec("m", 10), BUDGETS, LABELS) == ("spark1", "spark2", "small")
    assert candidates(spec("m", 40), BUDGETS, LABELS) == ("spark1", "spark2")
    assert candidates(spec("m", 10, node_labels={"gpu": "none"}), BUDGETS, LABELS) == ("small",)
    assert candidates(spec("m", 10, node=["small", "spark2"]), BUDGETS, LABELS) == ("spark2", "small")
    assert candidates(spec("m", 10, node="spark2"), BUDGETS, LABELS) == ("spark2",)
    process = ModelSpec.model_validate({"name": "p", "command": ["x"], "memory_gb": 1})
    assert candidates(process, {"local": Budget(), "spark2": Budget()}) == ("local",)


def test_placement_problems_say_what_is_missing() -> None:
    assert placement_problems(spec("m", 10, node="spark9"), BUDGETS, LABELS) == [
        "m: node: unknown node 'spark9' (configured: spark1, spark2, small)"]
    [too_big] = placement_problems(spec("m", 40, node="small"), BUDGETS, LABELS)
    assert too_big == "m: memory_gb: m needs 40 GB but node 'small' has a budget of 28 GB (32 total - 4 reserve)"
    [labels] = placement_problems(spec("m", 10, node_labels={"gpu": "h100"}), BUDGETS, LABELS)
    assert "needs a node with labels {'gpu': 'h100'}" in labels and "found 0 (none)" in labels
    group = spec("g", 100, nodes=2, engine="vllm", model="w", node=["spark1", "small"])
    problems = placement_problems(group, BUDGETS, LABELS)
    assert any("needs 2 nodes" in p and "found 1 (spark1)" in p for p in problems)
    assert placement_problems(spec("g", 100, nodes=2, engine="vllm", model="w"), BUDGETS, LABELS) == []
    with pytest.raises(ConfigError, match="unknown node 'spark9'"):
        Waker(Registry([spec("m", 1, node="spark9")]), runtimes={RuntimeKind.DOCKER: FakeRuntime()}, budgets=BUDGETS)


def test_spanning_several_nodes_is_validated_in_the_entry() -> None:
    with pytest.raises(ValueError, match="needs engine vllm"):
        spec("g", 10, nodes=2)
    with pytest.raises(ValueError, match="can't run on the one node"):
        spec("g", 10, nodes=2, engine="sglang", model="w", node="spark1")
    with pytest.raises(ValueError, match="host network"):
        spec("g", 10, nodes=2, engine="sglang", model="w", network="bridge")


# -- the cluster admission inside the waker ------------------------------------------------------------


@asynccontextmanager
async def cluster(*specs: ModelSpec, budgets: dict[str, float],
                  policy: QueuePolicy | None = None) -> AsyncIterator[Waker]:
    runtime = FakeRuntime()
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.DOCKER: runtime},
                  budgets={n: Budget(gb, 0) for n, gb in budgets.items()},
                  probes={n: FixedProbe(None) for n in budgets}, clock=FakeClock(),
                  queue=policy or QueuePolicy(), engine_api=FakeEngineApi(runtime))
    waker.runtime = runtime  # type: ignore[attr-defined]
    async with waker:
        yield waker


def held(waker: Waker) -> dict[str, float]:
    return {n: a.held_gb() for n, a in waker.admissions.items()}


def launched_on(waker: Waker, model: str) -> tuple[str, ...]:
    runtime: FakeRuntime = waker.runtime  # type: ignore[attr-defined]
    return [s for s in runtime.specs if s.name == model][-1].placed_on


async def use(waker: Waker, name: str) -> None:
    async with waker.lease(name):
        pass


async def test_cold_models_go_where_they_fit_and_each_node_keeps_its_own_ledger() -> None:
    async with cluster(spec("x", 60), spec("y", 45), spec("z", 30), budgets={"a": 100, "b": 50}) as w:
        await use(w, "x")
        await use(w, "y")  # a has 40 GB left: b, where it fits, rather than evicting x
        assert launched_on(w, "x") == ("a",) and launched_on(w, "y") == ("b",)
        assert held(w) == {"a": 60, "b": 45}
        await use(w, "z")  # fits on a (40 free), not on b (5 free)
        assert launched_on(w, "z") == ("a",)
        assert held(w) == {"a": 90, "b": 45}
        assert all(c.state is S.READY for c in w.controllers())
        placed = [e for e in w.events.recent() if e.kind == "placed"]
        # x (60 GB) can only ever run on a: nothing to choose, no placement event.
        assert [(e.model, e.data["nodes"]) for e in placed] == [("y", ["b"]), ("z", ["a"])]


async def test_when_every_node_is_full_the_least_valuable_idle_model_is_evicted() -> None:
    async with cluster(spec("vip", 80, node="a", priority=5), spec("cheap", 80, node="b"), spec("new", 60),
                       budgets={"a": 100, "b": 100}) as w:
        await use(w, "cheap")
        w.clock.advance(10)
        await use(w, "vip")
        await use(w, "new")
        assert launched_on(w, "new") == ("b",)
        assert w.controller("cheap").state is S.STOPPED and w.controller("vip").state is S.READY
        assert held(w) == {"a": 80, "b": 60}


async def test_a_stopped_model_is_placed_afresh_at_its_next_start() -> None:
    async with cluster(spec("x", 60), spec("other", 90), budgets={"a": 100, "b": 100}) as w:
        await use(w, "x")
        assert launched_on(w, "x") == ("a",)  # a tie: the first node listed
        await w.stop("x")
        assert w.scheduler.seats["x"].placed == ()
        await use(w, "other")
        await use(w, "x")
        assert launched_on(w, "other") == ("a",) and launched_on(w, "x") == ("b",)
        assert held(w) == {"a": 90, "b": 60}


async def test_a_model_that_may_run_anywhere_leaves_room_for_one_that_may_not() -> None:
    async with cluster(spec("any", 60), spec("only-a", 50, node="a"), budgets={"a": 100, "b": 120}) as w:
        await use(w, "any")  # a is the tighter fit, but only-a may run nowhere else
        await use(w, "only-a")
        assert launched_on(w, "any") == ("b",) and launched_on(w, "only-a") == ("a",)
        assert not [e for e in w.events.recent() if e.kind == "evict"]


def group(name: str = "g", gb: float = 30, **fields: object) -> ModelSpec:
    return spec(name, gb, engine="vllm", model="weights", nodes=2, **fields)


async def test_a_model_spanning_two_nodes_holds_memory_on_both_and_frees_both_when_stopped() -> None:
    async with cluster(group(), budgets={"a": 100, "b": 100, "c": 20}) as w:
        await use(w, "g")
        assert launched_on(w, "g") == ("a", "b")
        assert held(w) == {"a": 30, "b": 30, "c": 0}
        assert len(w.runtime.handles) == 1  # type: ignore[attr-defined]  # one start for the group
        await w.stop("g")
        assert held(w) == {"a": 0, "b": 0, "c": 0}


async def test_a_spanning_model_reserves_its_first_node_while_the_second_makes_room() -> None:
    async with cluster(group(node=["a", "b"]), spec("busy", 90, node="b"), budgets={"a": 100, "b": 100}) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        starting = asyncio.create_task(use(w, "g"))
        await w.events.wait_for(lambda e: e.kind == "queued" and e.model == "g", 1)
        assert held(w) == {"a": 30, "b": 90}  # a's share is held for g: nobody else may take it
        admits = [e.data["node"] for e in w.events.recent() if e.kind == "admit" and e.model == "g"]
        assert admits == ["a"]
        assert w.controller("g").state is S.STOPPED
        await lease.__aexit__(None, None, None)
        await asyncio.wait_for(starting, 1)
        admits = [e.data["node"] for e in w.events.recent() if e.kind == "admit" and e.model == "g"]
        assert admits == ["a", "b"]
        assert held(w) == {"a": 30, "b": 30}
        assert w.controller("busy").state is S.STOPPED


async def test_a_reservation_is_given_back_when_nobody_waits_any_more() -> None:
    async with cluster(group(node=["a", "b"]), spec("busy", 90, node="b"), spec("other", 80, node="a"),
                       budgets={"a": 100, "b": 100}) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        starting = asyncio.create_task(use(w, "g"))
        await w.events.wait_for(lambda e: e.kind == "queued" and e.model == "g", 1)
        assert held(w)["a"] == 30
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert held(w) == {"a": 0, "b": 90}
        await use(w, "other")  # a's memory is free again
        assert held(w) == {"a": 80, "b": 90}
        await lease.__aexit__(None, None, None)


async def test_a_drain_set_by_one_node_is_not_lifted_by_another() -> None:
    async with cluster(spec("filler", 50, node="a"), spec("hot", 60), spec("cold", 60, node="b"),
                       budgets={"a": 100, "b": 100}, policy=QueuePolicy(max_hold=30)) as w:
        await use(w, "filler")
        lease = w.lease("hot")
        await lease.__aenter__()
        assert launched_on(w, "hot") == ("b",)  # a would need an eviction
        cold = asyncio.create_task(use(w, "cold"))
        await w.events.wait_for(lambda e: e.kind == "drain" and e.model == "hot", 1)
        deadline = w.scheduler.seats["hot"].drain_deadline
        assert deadline is not None
        # Node a (where hot is registered but holds nothing) plans again: b's deadline stands.
        w.admissions["a"].step()
        await use(w, "filler")
        assert w.scheduler.seats["hot"].drain_deadline == deadline
        await lease.__aexit__(None, None, None)
        await asyncio.wait_for(cold, 1)
        assert w.controller("hot").state is S.STOPPED and w.scheduler.seats["hot"].drain_deadline is None
