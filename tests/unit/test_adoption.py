"""Engines an earlier gateway left running: taken over at boot within the budget, asleep when they sleep, stale
ones removed, and untracked ones found again later. Fake engines, a fake clock."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.registry import engine_for
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "runtime": "docker", "image": "img", "engine": "generic",
                                     "memory_gb": gb, "min_uptime": 0, **fields})


def launch_hash(s: ModelSpec) -> str:
    return engine_for(s.engine).launch_hash(s)


@asynccontextmanager
async def booted(runtime: FakeRuntime, *specs: ModelSpec, capacity: float = 100) -> AsyncIterator[Waker]:
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.DOCKER: runtime},
                  budgets={"local": Budget(capacity, 0)}, probes={"local": FixedProbe(None)}, clock=FakeClock(),
                  engine_api=FakeEngineApi(runtime))
    async with waker:
        yield waker


async def test_engines_found_at_boot_are_adopted_only_as_far_as_the_budget_holds_them() -> None:
    # Adoption used to take every engine it found, past the budget (after total_gb was lowered, or models added).
    runtime = FakeRuntime()
    important, other = spec("important", 60, priority=1), spec("other", 60)
    kept = runtime.leave_running("important", launch_hash(important))
    dropped = runtime.leave_running("other", launch_hash(other))
    async with booted(runtime, other, important, capacity=100) as w:
        assert w.controller("important").handle is kept  # higher priority first
        assert w.controller("other").state is S.STOPPED
        assert dropped.stops == 1 and runtime.discarded[0][0] == "other"
        assert "does not fit the memory budget any more (local: 60 of 100 GB held)" in runtime.discarded[0][1]
        assert w.admissions["local"].held_gb() == 60
        stale = [e for e in w.events.recent() if e.kind == "stale_engine"]
        assert [e.model for e in stale] == ["other"]


async def test_a_sleeping_engine_is_adopted_asleep_and_counted_by_its_sleeping_footprint() -> None:
    runtime = FakeRuntime()
    napper = spec("napper", 40, engine="vllm", model="w", idle_action="sleep", sleep_memory_gb=4)
    runtime.leave_running("napper", launch_hash(napper), asleep=True)
    async with booted(runtime, napper) as w:
        assert w.controller("napper").state is S.SLEEPING
        assert w.admissions["local"].held_gb() == 4
        async with w.lease("napper") as endpoint:  # woken, not restarted
            assert endpoint.api_base == "http://fake-1/v1"
        assert len(runtime.handles) == 1


async def test_an_engine_that_cannot_tell_it_sleeps_is_adopted_as_its_note_says() -> None:
    # SGLang has no /is_sleeping; its /health answers 200 asleep. The note the last gateway kept with the engine says
    # it sleeps: adopted SLEEPING (counted small) and woken with its wake calls, not sent requests while released.
    runtime = FakeRuntime()
    napper = spec("napper", 40, engine="sglang", model="/m", idle_action="sleep", sleep_memory_gb=4)
    awake = spec("awake", 40, engine="sglang", model="/m", idle_action="sleep", sleep_memory_gb=4)
    sleeping = runtime.leave_running("napper", launch_hash(napper), asleep=True, note=True)
    runtime.leave_running("awake", launch_hash(awake), asleep=False, note=None)
    async with booted(runtime, napper, awake) as w:
        assert w.controller("napper").state is S.SLEEPING
        await w.controller("awake").settled()  # probed like a fresh start
        assert w.controller("awake").state is S.READY
        assert w.admissions["local"].held_gb() == 44
        async with w.lease("napper") as endpoint:
            assert endpoint.api_base == "http://fake-1/v1"
        assert sleeping.calls == ["POST /resume_memory_occupation", "POST /update_weights_from_disk",
                                  "POST /v1/completions"]


async def test_an_engine_noted_asleep_that_is_awake_is_started_cold_on_its_first_request() -> None:
    # A note can be wrong (the gateway died between a wake and its note): the wake's check fails, a cold start answers.
    runtime = FakeRuntime()
    napper = spec("napper", 40, engine="sglang", model="/m", idle_action="sleep", sleep_memory_gb=4)
    engine = runtime.leave_running("napper", launch_hash(napper), asleep=False, note=True)
    engine.garbled = True  # SGLang's resume of tags it never released fails its scheduler
    async with booted(runtime, napper) as w:
        assert w.controller("napper").state is S.SLEEPING
        async with w.lease("napper") as endpoint:
            assert endpoint.api_base == "http://fake-2/v1"
        assert engine.exit_code is not None


async def test_an_engine_of_a_changed_or_removed_model_is_removed_at_boot() -> None:
    runtime = FakeRuntime()
    runtime.leave_running("m", launch_hash(spec("m", 10, args=["--old"])))
    runtime.leave_running("gone", launch_hash(spec("gone", 10)))
    async with booted(runtime, spec("m", 10, args=["--new"])) as w:
        assert sorted(r for _, r in runtime.discarded) == ["its model is no longer in models.d",
                                                          "its model's spec changed"]
        assert w.controller("m").state is S.STOPPED


async def test_an_engine_found_later_is_adopted_and_serves_the_requests_queued_for_its_model() -> None:
    # Rediscovery (a node that was unreachable at boot answers again) may find a model's engine while requests
    # for it wait for room: they join the adopted engine instead of waiting until max_wait.
    runtime = FakeRuntime()
    busy, late = spec("busy", 60), spec("late", 60)
    async with booted(runtime, busy, late, capacity=100) as w:
        async with w.lease("busy"):
            waiting = asyncio.create_task(w.gate("late").acquire())
            await w.events.wait_for(lambda e: e.kind == "queued" and e.model == "late", 1)
            found = runtime.leave_running("late", launch_hash(late))
            w.admissions["local"].budget = Budget(200, 0)  # (the node had room after all)
            await w._adopt_running_engines()  # what the reaper does every rediscover_interval
            endpoint = await asyncio.wait_for(waiting, 1)
            w.gate("late").release()
        assert endpoint.api_base == found.api_base
