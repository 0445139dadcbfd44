"""Admission end to end inside the waker, with fake engines and a fake clock: budget, eviction,
queueing, max_queue, max_wait, max_hold. Nothing here waits on real time except max_wait's timer."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import ConfigError, Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import NoRoom, QueueFull
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "command": ["x"], "memory_gb": gb, "min_uptime": 0, **fields})


@asynccontextmanager
async def waker_with(*specs: ModelSpec, capacity: float = 100, live: float | None = None,
                     policy: QueuePolicy | None = None, preload: tuple[str, ...] = ()) -> AsyncIterator[Waker]:
    runtime = FakeRuntime()
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.PROCESS: runtime},
                  budgets={"local": Budget(capacity, 0)}, probes={"local": FixedProbe(live)}, clock=FakeClock(),
                  queue=policy or QueuePolicy(), engine_api=FakeEngineApi(runtime), preload=preload)
    waker.runtime = runtime  # type: ignore[attr-defined]
    async with waker:
        yield waker


def held(waker: Waker) -> float:
    return waker.admissions["local"].held_gb()


async def use(waker: Waker, name: str) -> None:
    async with waker.lease(name):
        pass


async def test_third_model_evicts_the_least_recently_used_and_starts_when_its_memory_is_back() -> None:
    async with waker_with(spec("a", 40), spec("b", 40), spec("c", 40), capacity=100) as w:
        await use(w, "a")
        w.clock.advance(1)
        await use(w, "b")
        w.clock.advance(1)
        await use(w, "c")
        assert w.controller("a").state is S.STOPPED
        assert w.controller("b").state is S.READY and w.controller("c").state is S.READY
        evict = [e for e in w.events.recent() if e.kind == "evict"]
        assert [e.model for e in evict] == ["a"]
        assert "making room for c (40 GB needed, 20 GB free)" in evict[0].reason
        assert held(w) == 80
        assert w.admissions["local"].high_water_gb <= 100


async def test_busy_model_is_never_evicted_the_request_waits_for_it_to_drain() -> None:
    async with waker_with(spec("a", 60), spec("b", 60), capacity=100) as w:
        lease = w.lease("a")
        await lease.__aenter__()  # a request in flight on "a"
        waiting = asyncio.create_task(use(w, "b"))
        await w.events.wait_for(lambda e: e.kind == "queued" and e.model == "b", 1)
        assert w.controller("a").state is S.READY
        assert not waiting.done()
        await lease.__aexit__(None, None, None)  # "a" drains: it becomes the victim, "b" starts
        await asyncio.wait_for(waiting, 1)
        assert w.controller("a").state is S.STOPPED and w.controller("b").state is S.READY


async def test_hot_model_cannot_starve_a_cold_one_beyond_max_hold() -> None:
    async with waker_with(spec("hot", 60), spec("cold", 60), capacity=100,
                          policy=QueuePolicy(max_hold=30)) as w:
        first = w.lease("hot")
        await first.__aenter__()
        cold = asyncio.create_task(use(w, "cold"))
        await w.events.wait_for(lambda e: e.kind == "drain" and e.model == "hot", 1)

        # Before max_hold, "hot" still takes new work (overlapping, so it never drains on its own).
        second = w.lease("hot")
        await second.__aenter__()
        await first.__aexit__(None, None, None)
        assert w.controller("hot").in_flight == 1

        # After max_hold, new work for "hot" is held back; the last request ends, "hot" stops, "cold" runs.
        w.clock.advance(31)
        third = asyncio.create_task(use(w, "hot"))
        await asyncio.sleep(0)
        assert not third.done()
        await second.__aexit__(None, None, None)
        await asyncio.wait_for(cold, 1)
        # The held-back request is served after "cold" (it queued behind it).
        await asyncio.wait_for(third, 1)
        ready = [e.model for e in w.events.recent() if e.kind == "transition" and e.target == "ready"]
        assert ready == ["hot", "cold", "hot"]


async def test_queue_limit_answers_queue_full() -> None:
    async with waker_with(spec("a", 60), spec("b", 60), capacity=100, policy=QueuePolicy(max_queue=2)) as w:
        lease = w.lease("a")
        await lease.__aenter__()
        waiters = [asyncio.create_task(use(w, "b")) for _ in range(2)]
        await w.events.wait_for(lambda e: e.kind == "queued", 1)
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 requests already wait for room"):
            await use(w, "b")
        await lease.__aexit__(None, None, None)
        await asyncio.gather(*waiters)


async def test_max_wait_answers_no_room_with_the_numbers() -> None:
    async with waker_with(spec("a", 60), spec("b", 70), capacity=100, policy=QueuePolicy(max_wait=0.05)) as w:
        lease = w.lease("a")
        await lease.__aenter__()
        with pytest.raises(NoRoom) as err:
            await use(w, "b")
        assert "b needs 70 GB; 40 GB of the 100 GB budget on node 'local' is free; held by a (60 GB, 1 in flight)" \
            in err.value.message
        assert w.admissions["local"].queued == 0  # the ticket is gone with its last waiter
        await lease.__aexit__(None, None, None)


async def test_request_that_leaves_the_queue_removes_its_ticket() -> None:
    async with waker_with(spec("a", 60), spec("b", 60), capacity=100) as w:
        lease = w.lease("a")
        await lease.__aenter__()
        waiting = asyncio.create_task(use(w, "b"))
        await w.events.wait_for(lambda e: e.kind == "queued", 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert w.admissions["local"].queued == 0
        await lease.__aexit__(None, None, None)
        assert w.controller("a").state is S.READY  # nobody wanted "b" any more: "a" stays


async def test_pinned_model_is_kept_and_an_impossible_request_fails_at_once() -> None:
    async with waker_with(spec("pin", 70, pinned=True), spec("x", 40), capacity=100) as w:
        await use(w, "pin")
        with pytest.raises(NoRoom, match="only 30 GB of the 100 GB budget is not held by pinned models"):
            await use(w, "x")
        assert w.controller("pin").state is S.READY


async def test_preload_starts_models_at_boot_in_order() -> None:
    async with waker_with(spec("a", 10), spec("b", 10), preload=("b", "a")) as w:
        await w.events.wait_for(lambda e: e.kind == "preloaded" and e.model == "a", 1)
        ready = [e.model for e in w.events.recent() if e.kind == "transition" and e.target == "ready"]
        assert ready == ["b", "a"]


async def test_live_memory_holds_a_start_the_ledger_would_allow() -> None:
    async with waker_with(spec("a", 40), capacity=100, live=30.0, policy=QueuePolicy(max_wait=0.05)) as w:
        with pytest.raises(NoRoom):
            await use(w, "a")
        assert w.controller("a").state is S.STOPPED


def test_model_bigger_than_its_node_is_rejected_at_load() -> None:
    with pytest.raises(ConfigError, match="big needs 200 GB but node 'local' has a budget of 120 GB"):
        Waker(Registry([spec("big", 200)]), runtimes={RuntimeKind.PROCESS: FakeRuntime()},
              budgets={"local": Budget(128, 8)})


def test_unknown_node_and_preload_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        Waker(Registry([spec("m", 1, node="spark9")]), runtimes={RuntimeKind.PROCESS: FakeRuntime()}, preload=["nope"])
    assert any("unknown node 'spark9'" in p for p in err.value.problems)
    assert any("preload: 'nope'" in p for p in err.value.problems)
