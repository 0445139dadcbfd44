"""The simulation's fake world on its own, in virtual time: engines, the runtime that runs them, their HTTP API."""

import asyncio
import time
from typing import Any

import pytest

from tests.sim.vtime import START, VirtualTime, advance
from tests.sim.world import SIGKILLED, Behaviour, EngineState, SimEngine, SimEngineApi, SimRuntime
from waker.config.spec import ModelSpec
from waker.engines.base import Call, Readiness
from waker.engines.registry import engine_for
from waker.lifecycle.engine_api import EngineCallError
from waker.runtime.base import Adopter, Exit, RuntimeUnavailable

HEALTH = Readiness("/health")


def model(name: str = "m", **fields: Any) -> ModelSpec:
    """A vLLM model in Docker that can sleep, as launched (its adapter's launch_spec)."""
    fields = {"idle_action": "sleep", **fields}
    spec = ModelSpec(name=name, engine="vllm", runtime="docker", image="sim", model="weights", memory_gb=10, **fields)
    return engine_for(spec.engine).launch_spec(spec)


async def start(runtime: SimRuntime, spec: ModelSpec) -> SimEngine:
    return await runtime.start(spec, engine_for(spec.engine))


def test_a_start_that_takes_30_virtual_seconds_returns_at_once(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(creation_time=30, load_time=60))
    began = time.perf_counter()
    engine = vt.run(start(runtime, model()))
    assert time.perf_counter() - began < 0.5
    assert vt.now() == START + 30
    assert engine.state is EngineState.LOADING
    assert runtime.running() == [engine]
    vt.run(SimEngineApi(runtime).until_ready(engine.root_url, HEALTH, "m"))
    assert vt.now() == START + 90
    assert engine.state is EngineState.READY


def test_an_engine_that_hangs_at_start_is_never_ready(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=None))
    engine = vt.run(start(runtime, model()))
    with pytest.raises(TimeoutError):
        vt.run(asyncio.wait_for(SimEngineApi(runtime).until_ready(engine.root_url, HEALTH, "m"), 600))
    assert engine.state is EngineState.LOADING
    assert runtime.running() == [engine]


def test_an_engine_that_exits_at_start_reports_its_code_and_is_never_ready(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(creation_time=1, load_time=10, exit_after=3, exit_code=2))
    engine = vt.run(start(runtime, model()))
    assert vt.run(engine.wait_exit()) == Exit(2)
    assert vt.now() == START + 4
    assert engine.exit_code == 2
    assert runtime.running() == []
    with pytest.raises(TimeoutError):
        vt.run(asyncio.wait_for(SimEngineApi(runtime).until_ready(engine.root_url, HEALTH, "m"), 600))


def test_an_engine_that_ignores_sigterm_takes_exactly_the_grace(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(ignores_sigterm=True))
    engine = vt.run(start(runtime, model()))
    began = vt.now()
    assert vt.run(engine.stop(20)) == SIGKILLED
    assert vt.now() == began + 20
    assert engine.state is EngineState.EXITED and engine.removed
    assert vt.run(engine.wait_exit()) == Exit(SIGKILLED)


def test_an_engine_that_honours_sigterm_ends_after_its_shutdown_time(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(shutdown_time=2))
    engine = vt.run(start(runtime, model()))
    began = vt.now()
    assert vt.run(engine.stop(20)) == 0
    assert vt.now() == began + 2


def test_a_cancelled_stop_still_ends_the_engine_on_time(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(ignores_sigterm=True))
    engine = vt.run(start(runtime, model()))
    began = vt.now()

    async def stop_then_give_up() -> None:
        stopping = asyncio.create_task(engine.stop(20))
        await advance(5)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping

    vt.run(stop_then_give_up())
    assert engine.state is EngineState.READY  # still within its grace
    vt.run(engine.wait_exit())
    assert vt.now() == began + 20
    assert engine.removed and runtime.running() == []


def test_a_second_stop_with_a_shorter_grace_kills_sooner(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(ignores_sigterm=True))
    engine = vt.run(start(runtime, model()))
    began = vt.now()

    async def two_stops() -> tuple[int | None, int | None]:
        first = asyncio.create_task(engine.stop(60))
        await advance(1)
        return await engine.stop(5), await first

    assert vt.run(two_stops()) == (SIGKILLED, SIGKILLED)
    assert vt.now() == began + 6


def test_a_start_cancelled_while_the_engine_is_made_leaves_nothing(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(creation_time=30))

    async def start_then_cancel() -> None:
        starting = asyncio.create_task(start(runtime, model()))
        await advance(10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    vt.run(start_then_cancel())
    vt.run(advance(3600))
    [engine] = runtime.engines
    assert engine.state is EngineState.EXITED and engine.removed
    assert runtime.running() == []
    assert vt.run(runtime.discover()) == []


def test_an_outage_refuses_calls_and_hides_exits_until_the_runtime_is_back(vt: VirtualTime) -> None:
    runtime = SimRuntime()
    engine = vt.run(start(runtime, model()))
    watch = vt.loop.create_task(engine.wait_exit())
    runtime.down()
    with pytest.raises(RuntimeUnavailable):
        vt.run(start(runtime, model("other")))
    with pytest.raises(RuntimeUnavailable):
        vt.run(engine.stop(10))
    with pytest.raises(RuntimeUnavailable):
        vt.run(engine.log_tail(10))
    assert vt.run(runtime.discover()) == []  # as Docker's: unreachable nodes are skipped
    assert engine.state is EngineState.LOADING  # the refused stop did nothing

    engine.crash(137, oom=True)
    vt.run(advance(600))
    assert engine.state is EngineState.EXITED  # it is gone, and nobody knows yet
    assert not watch.done() and engine.exit_code is None

    runtime.up()
    assert vt.run(watch) == Exit(137, oom_killed=True)
    assert engine.exit_code == 137
    assert "crashed: exit code 137 (SIGKILL), killed for lack of memory (OOM)" in vt.run(engine.log_tail(1))


def test_a_stop_whose_runtime_goes_away_meanwhile_raises_though_the_engine_ends(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(ignores_sigterm=True))
    engine = vt.run(start(runtime, model()))

    async def stop_during_outage() -> None:
        stopping = asyncio.create_task(engine.stop(20))
        await advance(5)
        runtime.down()
        with pytest.raises(RuntimeUnavailable):
            await stopping

    vt.run(stop_during_outage())
    assert engine.state is EngineState.EXITED and engine.removed
    assert engine.exit_code is None  # not reported before the runtime is back
    runtime.up()
    assert engine.exit_code == SIGKILLED


def test_an_outage_on_one_node_touches_only_engines_there(vt: VirtualTime) -> None:
    runtime = SimRuntime(nodes=("a", "b"))
    on_a = vt.run(start(runtime, model("on-a", node="a")))
    spanning = vt.run(start(runtime, model("both", placed_on=("a", "b"), nodes=2, idle_action="stop")))
    assert spanning.nodes == ("a", "b")
    runtime.down("b")
    with pytest.raises(RuntimeUnavailable, match="on b"):
        vt.run(spanning.stop(10))
    with pytest.raises(RuntimeUnavailable):
        vt.run(start(runtime, model("on-b", node="b")))
    assert vt.run(on_a.stop(10)) == 0
    assert [f.model for f in vt.run(runtime.discover())] == []  # on-a was removed; both is on b
    runtime.up("b")
    assert [f.model for f in vt.run(runtime.discover())] == ["both"]


def test_a_runtime_that_goes_away_during_creation_fails_the_start_and_leaves_nothing(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(creation_time=10))

    async def outage_during_creation() -> None:
        starting = asyncio.create_task(start(runtime, model()))
        await advance(5)
        runtime.down()
        with pytest.raises(RuntimeUnavailable):
            await starting

    vt.run(outage_during_creation())
    assert runtime.running() == []


def test_a_launch_error_is_raised_and_makes_nothing(vt: VirtualTime) -> None:
    runtime = SimRuntime()
    runtime.script("m", Behaviour(launch_error=RuntimeError("image 'sim' is not on a")))
    with pytest.raises(RuntimeError, match="not on a"):
        vt.run(start(runtime, model()))
    assert runtime.engines == []
    assert vt.run(start(runtime, model())).state is EngineState.LOADING  # the script was for one start


def test_scripts_apply_to_a_models_next_starts_in_order(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=5))
    runtime.script("m", Behaviour(load_time=None), Behaviour(exit_after=1))
    states = []
    for _ in range(3):
        engine = vt.run(start(runtime, model()))
        vt.run(advance(60))
        states.append(engine.state)
        vt.run(engine.stop(0))
    other = vt.run(start(runtime, model("other")))
    vt.run(advance(60))
    assert (*states, other.state) == (EngineState.LOADING, EngineState.EXITED, EngineState.READY, EngineState.READY)


def test_a_start_uses_a_running_engine_of_the_model_on_its_node_and_removes_any_other(vt: VirtualTime) -> None:
    """As DockerRuntime.start does with the containers of a model on the node it starts on."""
    runtime = SimRuntime(default=Behaviour(load_time=5))
    first = vt.run(start(runtime, model()))
    vt.run(advance(10))
    assert vt.run(start(runtime, model())) is first  # the same spec: used as it is
    changed = vt.run(start(runtime, model(args=("--other",))))
    vt.run(advance(1))
    assert changed is not first and first.state is EngineState.EXITED and first.removed


def test_discover_claim_and_discard(vt: VirtualTime) -> None:
    runtime = SimRuntime()
    assert isinstance(runtime, Adopter) and runtime.detached
    running = vt.run(start(runtime, model("running")))
    kept = vt.run(start(runtime, model("kept", keep_container=True)))
    crashed = vt.run(start(runtime, model("crashed")))
    vt.run(kept.stop(10))
    crashed.crash(1)

    found = {f.model: f for f in vt.run(runtime.discover())}
    assert {name: f.running for name, f in found.items()} == {"running": True, "kept": False, "crashed": False}
    assert found["running"].spec_hash == model("running").spec_hash()
    assert found["running"].handle is running and found["running"].nodes == ("a",)

    adopted = runtime.claim(found["running"], model("running", keep_container=True))
    assert adopted is running and adopted.keep
    vt.run(adopted.stop(10))
    assert running.state is EngineState.EXITED and not running.removed  # kept, as its spec now says

    vt.run(runtime.discard(found["kept"], "its model is no longer in models.d"))
    vt.run(runtime.discard(found["crashed"], "stopped and not kept"))
    assert [f.model for f in vt.run(runtime.discover())] == ["running"]


def test_discard_stops_a_running_engine(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(ignores_sigterm=True))
    vt.run(start(runtime, model()))
    [found] = vt.run(runtime.discover())
    began = vt.now()
    vt.run(runtime.discard(found, "its model's spec changed"))
    assert vt.now() == began + 10
    assert runtime.running() == [] and vt.run(runtime.discover()) == []


def test_a_new_start_removes_what_is_left_of_the_models_earlier_engines(vt: VirtualTime) -> None:
    runtime = SimRuntime()
    kept = vt.run(start(runtime, model(keep_container=True)))
    vt.run(kept.stop(10))
    vt.run(start(runtime, model(keep_container=True)))
    assert kept.removed
    assert [f.running for f in vt.run(runtime.discover())] == [True]


def test_sleep_and_wake_through_the_engines_api(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=5, sleep_time=2, wake_time=1))
    api = SimEngineApi(runtime)
    spec = model()
    adapter = engine_for(spec.engine)
    engine = vt.run(start(runtime, spec))
    url = engine.root_url
    asks = adapter.sleep_state_call(spec)
    assert asks is not None
    assert vt.run(api.is_sleeping(url, asks)) is None  # not answering yet
    vt.run(api.until_ready(url, HEALTH, "m"))

    began = vt.now()
    vt.run(api.call(url, adapter.sleep_calls(spec), timeout=30))
    assert vt.now() == began + 2
    assert engine.state is EngineState.ASLEEP and vt.run(api.is_sleeping(url, asks)) is True
    vt.run(api.until_ready(url, HEALTH, "m"))  # a sleeping engine still answers its health route

    vt.run(api.call(url, adapter.wake_calls(spec), timeout=30))
    assert vt.now() == began + 2 + 3  # three calls to wake from level 2
    assert engine.state is EngineState.READY and vt.run(api.is_sleeping(url, asks)) is False


def test_a_failed_wake_leaves_it_asleep_and_an_exit_while_waking_fails_the_call(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=0))
    api = SimEngineApi(runtime)
    spec = model()
    adapter = engine_for(spec.engine)
    engine = vt.run(start(runtime, spec))
    vt.run(advance(1))
    vt.run(api.call(engine.root_url, adapter.sleep_calls(spec), timeout=30))

    engine.behaviour.fail_wake = True
    with pytest.raises(EngineCallError, match="500"):
        vt.run(api.call(engine.root_url, adapter.wake_calls(spec), timeout=30))
    assert engine.state is EngineState.ASLEEP

    engine.behaviour.fail_wake = False
    engine.behaviour.exit_on_wake = 1
    with pytest.raises(EngineCallError, match="exited"):
        vt.run(api.call(engine.root_url, adapter.wake_calls(spec), timeout=30))
    assert vt.run(engine.wait_exit()) == Exit(1)
    with pytest.raises(EngineCallError, match="cannot connect"):
        vt.run(api.call(engine.root_url, adapter.wake_calls(spec), timeout=30))


def test_a_slow_call_times_out_but_the_engine_still_does_the_work(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=0, sleep_time=50))
    api = SimEngineApi(runtime)
    spec = model()
    engine = vt.run(start(runtime, spec))
    vt.run(advance(1))
    with pytest.raises(EngineCallError, match="no answer in 10"):
        vt.run(api.call(engine.root_url, engine_for(spec.engine).sleep_calls(spec), timeout=10))
    assert engine.state is EngineState.READY
    vt.run(advance(40))
    assert engine.state is EngineState.ASLEEP


def test_routes_an_engine_lacks_answer_404(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=0))
    api = SimEngineApi(runtime)
    generic = ModelSpec(name="g", engine="generic", runtime="docker", image="sim", memory_gb=1)
    engine = vt.run(runtime.start(generic, engine_for(generic.engine)))
    vt.run(advance(1))
    with pytest.raises(EngineCallError, match="404"):
        vt.run(api.call(engine.root_url, (Call("POST", "/sleep?level=1"),), timeout=30))
    with pytest.raises(EngineCallError, match="cannot connect"):
        vt.run(api.call("http://nowhere", (Call("POST", "/wake_up"),), timeout=30))


def test_a_wrong_served_name_is_never_ready(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=Behaviour(load_time=0))
    engine = vt.run(start(runtime, model()))
    with pytest.raises(TimeoutError):
        vt.run(asyncio.wait_for(SimEngineApi(runtime).until_ready(engine.root_url, Readiness("/v1/models", True),
                                                                  "someone-else"), 60))


def test_a_world_run_twice_happens_alike() -> None:
    def story() -> list[tuple[float, str, str]]:
        with VirtualTime() as vt:
            runtime = SimRuntime(default=Behaviour(creation_time=1, load_time=7, shutdown_time=3))
            runtime.script("b", Behaviour(exit_after=4, exit_code=3))

            async def program() -> None:
                engines = await asyncio.gather(*(start(runtime, model(name)) for name in "abc"))
                await advance(10)
                await asyncio.gather(*(e.stop(5) for e in engines))

            vt.run(program())
            return [(vt.now(), e.ident, "; ".join(e.lines)) for e in runtime.engines]

    assert story() == story()
