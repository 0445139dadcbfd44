"""Each model remembers how long its latest starts and wakes took (ModelController.typical_start_s, typical_wake_s:
the median of the last five), for the estimate a waiting request is shown and the timeout hint (gateway/hints.py).
Fake engines and a fake clock: the durations are the clock's. New behaviour: every test failed before (no such
property, no field in the read model)."""

import asyncio

from tests.fakes import FakeEngineApi, FakeRuntime
from tests.unit.lifecycle.test_controller import VLLM_SLEEP, make, sleeping
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.registry import engine_for
from waker.gate import Gate
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


async def start_taking(gate: Gate, runtime: FakeRuntime, clock: FakeClock, seconds: float) -> None:
    """One cold start of `gate`'s model that takes `seconds` on the fake clock, served once, then stopped."""
    before = len(runtime.handles)
    request = asyncio.create_task(gate.acquire())
    while len(runtime.handles) == before:  # the start's task launches the engine within a few steps
        await asyncio.sleep(0)
    clock.advance(seconds)
    runtime.handles[-1].ready.set()
    await request
    gate.release()
    await gate.controller.stop("next start")


async def test_the_typical_start_is_the_median_of_the_latest_five_and_the_read_model_shows_it() -> None:
    clock = FakeClock()
    async with make(runtime=FakeRuntime(auto_ready=False), clock=clock) as (gate, runtime, _):
        assert gate.controller.typical_start_s is None  # never started here: no estimate
        for seconds in (400, 10, 30, 50, 20, 100):  # the first is forgotten (five are kept)
            await start_taking(gate, runtime, clock, seconds)
        assert gate.controller.typical_start_s == 30  # median of 10, 30, 50, 20, 100
        assert gate.controller.typical_wake_s is None


async def test_wakes_are_remembered_apart_from_starts() -> None:
    clock = FakeClock()
    async with make(clock=clock, **VLLM_SLEEP) as (gate, runtime, _):
        await sleeping(gate, runtime)
        api: FakeEngineApi = gate.controller._api  # type: ignore[assignment]
        api.block = asyncio.Event()  # the wake calls wait: the wake takes what the clock says
        request = asyncio.create_task(gate.acquire())
        await gate.controller.changed().wait()
        assert gate.controller.state is S.WAKING
        await asyncio.sleep(0)  # the wake's first step (scheduled just after WAKING was entered) notes its start
        clock.advance(8)
        api.block.set()
        await request
        gate.release()
        assert gate.controller.typical_wake_s == 8
        assert gate.controller.typical_start_s == 0  # its one cold start took no fake time


def spec(name: str, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "runtime": "docker", "image": "img", "engine": "generic",
                                     "memory_gb": 10, "min_uptime": 0, **fields})


async def test_an_adopted_engine_is_no_start_and_history_survives_reloads_that_keep_the_engine() -> None:
    clock = FakeClock()
    runtime = FakeRuntime(auto_ready=False)
    m = spec("m")
    runtime.leave_running("m", engine_for(m.engine).launch_hash(m))  # left by an earlier gateway: ready at once
    waker = Waker(Registry([m]), runtimes={RuntimeKind.DOCKER: runtime}, budgets={"local": Budget(100, 0)},
                  probes={"local": FixedProbe(None)}, clock=clock, engine_api=FakeEngineApi(runtime))
    async with waker:
        await waker.events.wait_for(lambda e: e.target == "ready", timeout=1)
        assert waker.describe().model("m").typical_start_s is None  # adopted: no start of ours
        await waker.stop("m")
        await start_taking(waker.gate("m"), runtime, clock, 42)
        assert waker.describe().model("m").typical_start_s == 42

        await waker.reload(Registry([spec("m", priority=5, idle_timeout=60)]))  # policy only: same engine
        assert waker.describe().model("m").typical_start_s == 42
        await waker.reload(Registry([spec("m", args=["--another-flag"])]))  # reshaped: a new engine's history
        assert waker.describe().model("m").typical_start_s is None
