"""Failures the simulation (tests/sim/test_simulation.py) found, shrunk and written out as plain scenarios: the
real waker over the fake world (tests/sim/world.py), in virtual time.

A scenario marked xfail(strict=True) shows a defect of the waker that is not fixed yet: it fails today (so the
suite stays green), and once the waker is fixed it passes, which strict xfail reports, so the mark comes off.
"""

import asyncio
import dataclasses

import pytest

from tests.sim.machine import CATALOGUE, NORMAL, OPTIONS, boot
from tests.sim.vtime import VirtualTime, advance
from tests.sim.world import EngineState, SimEngine, SimRuntime
from waker.config.registry import Registry
from waker.engines.registry import engine_for
from waker.errors import StartFailed
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


def started(vt: VirtualTime, runtime: SimRuntime, *names: str) -> Waker:
    return vt.run(boot(vt, runtime, [CATALOGUE[name] for name in names]))


async def serve(waker: Waker, model: str, seconds: float = 0.0) -> None:
    async with waker.lease(model):
        await asyncio.sleep(seconds)


def test_two_clients_leaving_a_max_concurrent_model_at_one_instant_both_just_leave(vt: VirtualTime) -> None:
    """Found as a request ending in ValueError: requests for tiny whose clients left 0.2 s in, behind its start."""
    runtime = SimRuntime(default=NORMAL)
    waker = started(vt, runtime, "tiny")  # max_concurrent 1
    gate = waker.gate("tiny")

    async def client() -> None:
        async with gate.slot():
            await serve(waker, "tiny", 10)

    async def both_leave_at_once() -> list[BaseException | None]:
        first = asyncio.create_task(client())  # holds the one slot while tiny starts
        second = asyncio.create_task(client())  # waits for that slot
        await advance(1)
        first.cancel()
        second.cancel()
        return list(await asyncio.gather(first, second, return_exceptions=True))

    outcomes = vt.run(both_leave_at_once())
    assert [type(o) for o in outcomes] == [asyncio.CancelledError, asyncio.CancelledError]
    assert gate.limiter.active == 0 and gate.limiter.waiting == 0


def test_a_second_stop_cancels_a_start_begun_as_the_first_stop_ended_cleanly(vt: VirtualTime) -> None:
    """Found as an internal_error: admin_stop_while_the_engine_is_created(big), twice."""
    runtime = SimRuntime(default=NORMAL)
    waker = started(vt, runtime, "big")
    vt.run(serve(waker, "big"))
    runtime.engines[0].behaviour.ignores_sigterm = True  # its stop takes the whole grace (5 s)

    async def scenario() -> BaseException | None:
        first_stop = asyncio.create_task(waker.stop("big"))
        await advance(1)
        request = asyncio.create_task(serve(waker, "big"))  # waits for the stop to end, then starts big again
        await advance(1)
        second_stop = asyncio.create_task(waker.stop("big"))  # waits for the first stop, then stops what runs
        await asyncio.gather(first_stop, second_stop)
        [outcome] = await asyncio.gather(request, return_exceptions=True)
        return outcome

    outcome = vt.run(scenario())
    assert isinstance(outcome, StartFailed) and "cancelled" in outcome.message
    assert [e.reason for e in waker.events.recent() if e.kind == "internal_error"] == []
    controller = waker.controller("big")
    assert controller.state is S.STOPPED and controller.failures == 0


def restarted_during_an_outage_of_a(vt: VirtualTime) -> tuple[Waker, SimRuntime, SimEngine]:
    """big runs on a (the only node it fits) and small on b; the gateway restarts while a is unreachable, and a
    comes back. Returns the new waker, the world and big's engine."""
    runtime = SimRuntime(default=NORMAL)
    waker = started(vt, runtime, "big", "small")
    vt.run(serve(waker, "big"))
    vt.run(serve(waker, "small"))
    [big, small] = runtime.running()
    runtime.down("a")
    vt.run(waker.shutdown())
    waker = started(vt, runtime, "big", "small")
    assert waker.describe().model("small").engine is small  # adopted: its node was reachable
    runtime.up("a")
    return waker, runtime, big


def test_engines_on_a_node_unreachable_at_boot_are_tracked_once_it_is_back(vt: VirtualTime) -> None:
    """Found as an orphan: shrunk to runtime_down(a), gateway_restart."""
    waker, runtime, big = restarted_during_an_outage_of_a(vt)
    vt.run(advance(OPTIONS.rediscover_interval + OPTIONS.reap_interval + 1))
    # Adopted once its node is back, or removed: not left running with nobody tracking it.
    assert waker.describe().model("big").engine is big or big.state is EngineState.EXITED
    vt.run(serve(waker, "big"))
    assert len([e for e in runtime.running() if e.spec.name == "big"]) == 1


def test_a_request_as_soon_as_the_node_is_back_starts_no_second_engine(vt: VirtualTime) -> None:
    """The start lands on the node of the engine nobody tracks yet and uses it, as DockerRuntime.start uses a running
    container of the model launched from the same spec (the world started a second one beside it)."""
    waker, runtime, big = restarted_during_an_outage_of_a(vt)
    vt.run(serve(waker, "big"))
    assert [e for e in runtime.running() if e.spec.name == "big"] == [big]


def test_a_stop_while_the_runtime_creates_the_engine_leaves_nothing_running(vt: VirtualTime) -> None:
    """The rule admin_stop_while_the_engine_is_created on its own."""
    runtime = SimRuntime(default=NORMAL)
    runtime.script("big", dataclasses.replace(NORMAL, creation_time=20.0))
    waker = started(vt, runtime, "big")

    async def scenario() -> BaseException | None:
        request = asyncio.create_task(serve(waker, "big"))
        await advance(2)
        await waker.stop("big")
        [outcome] = await asyncio.gather(request, return_exceptions=True)
        return outcome

    assert isinstance(vt.run(scenario()), StartFailed)
    assert waker.controller("big").state is S.STOPPED
    assert runtime.running() == []
    [engine] = runtime.engines
    assert engine.state is EngineState.EXITED and engine.removed
    vt.run(serve(waker, "big"))  # and it starts again on the next request


def test_two_warms_of_models_that_do_not_fit_together_both_end(vt: VirtualTime) -> None:
    """Found as a warm not ended after 600 s: big (raised to 90 GB) and wide evicting each other every 5.5 s."""
    runtime = SimRuntime(default=NORMAL)
    mid_on_a = CATALOGUE["mid"].model_copy(update={"node": "a"})  # 40 GB beside big's 70 on a's 100: no room
    waker = vt.run(boot(vt, runtime, [CATALOGUE["big"], mid_on_a]))

    async def both_warm() -> int:
        warms = [asyncio.create_task(waker.warm(name)) for name in ("big", "mid")]
        done, _ = await asyncio.wait(warms, timeout=600)
        return len(done)

    assert vt.run(both_warm()) == 2
    assert len(runtime.engines) <= 3, f"{len(runtime.engines)} engines started for two warms"


def test_a_waker_that_shut_down_leaves_the_engines_it_left_running_alone(vt: VirtualTime) -> None:
    """Found in the events of a run: a model of the waker before a restart turned FAILED and reaped an engine."""
    runtime = SimRuntime(default=NORMAL)
    first = started(vt, runtime, "mid")
    vt.run(serve(first, "mid"))
    vt.run(first.shutdown())
    second = started(vt, runtime, "mid")  # adopts mid's engine
    [engine] = runtime.running()
    assert second.describe().model("mid").engine is engine

    vt.run(second.stop("mid"))
    vt.run(advance(1))
    assert first.controller("mid").state is S.READY  # as it was left: it no longer owns that engine
    assert [e.reason for e in first.events.recent("mid") if e.target == S.FAILED] == []


def held(waker: Waker, node: str) -> float:
    return waker.admissions[node].held_gb()


def test_a_reload_raising_memory_gb_keeps_a_waiting_multi_node_start_within_budget(vt: VirtualTime) -> None:
    """Found as "node a: 115.0 of 100.0 GB held": reload_memory(wide, 45) while wide waited for room on b."""
    runtime = SimRuntime(default=NORMAL)
    mid_on_b = CATALOGUE["mid"].model_copy(update={"node": "b"})
    wide = CATALOGUE["wide"]  # 20 GB on each of a and b
    waker = vt.run(boot(vt, runtime, [CATALOGUE["big"], mid_on_b, wide]))

    clients: list[asyncio.Task[None]] = []

    async def scenario() -> None:
        clients.append(asyncio.create_task(serve(waker, "mid", 100)))  # 40 of b's 50 GB, busy: wide waits on b
        await advance(10)
        clients.append(asyncio.create_task(serve(waker, "wide")))  # a holds wide's 20 GB while b makes room
        await advance(1)
        clients.append(asyncio.create_task(serve(waker, "big")))  # 70 GB beside wide's 20 on a's 100
        await advance(1)
        await waker.reload(Registry([CATALOGUE["big"], mid_on_b, wide.model_copy(update={"memory_gb": 45})]))

    vt.run(scenario())
    assert held(waker, "a") <= 100


def test_a_multi_node_start_that_waited_through_a_reload_is_counted_as_launched(vt: VirtualTime) -> None:
    """Found as "node a: engines hold 55.0 GB, the ledger 30.0" (a long run: wide's memory_gb raised while its
    start waited for room on b)."""
    runtime = SimRuntime(default=NORMAL)
    mid_on_b = CATALOGUE["mid"].model_copy(update={"node": "b"})
    wide = CATALOGUE["wide"]  # 20 GB on each of a and b
    waker = vt.run(boot(vt, runtime, [mid_on_b, wide]))
    clients: list[asyncio.Task[None]] = []

    async def scenario() -> None:
        clients.append(asyncio.create_task(serve(waker, "mid", 30)))  # 40 of b's 50 GB, busy: wide waits on b
        await advance(10)
        waiting = asyncio.create_task(serve(waker, "wide"))  # a holds wide's 20 GB while b makes room
        await advance(1)
        await waker.reload(Registry([mid_on_b, wide.model_copy(update={"memory_gb": 45})]))
        await waiting  # mid is done, stopped for room on b, and wide starts

    vt.run(scenario())
    [engine] = [e for e in runtime.running() if e.spec.name == "wide"]
    assert [held(waker, n) >= engine.memory_gb for n in ("a", "b")] == [True, True], \
        f"wide launched declaring {engine.memory_gb:g} GB; ledgers: a {held(waker, 'a'):g}, b {held(waker, 'b'):g}"


def test_a_start_over_an_engine_that_could_not_be_stopped_counts_what_that_engine_holds(vt: VirtualTime) -> None:
    """Found as "node b: engines hold 20.0 GB, the ledger 15.0": reload_memory(wide, 15), an outage of a, its idle
    stop failing, then a request for wide."""
    runtime = SimRuntime(default=NORMAL)
    mid_on_a = CATALOGUE["mid"].model_copy(update={"node": "a"})
    waker = vt.run(boot(vt, runtime, [mid_on_a]))
    vt.run(serve(waker, "mid"))
    [engine] = runtime.running()  # holds 40 GB on a
    vt.run(waker.reload(Registry([mid_on_a.model_copy(update={"memory_gb": 30})])))  # from its next start

    runtime.down("a")
    vt.run(waker.stop("mid"))  # can't be stopped: FAILED, its engine still counted
    assert waker.controller("mid").state is S.FAILED and held(waker, "a") == 40

    clients: list[asyncio.Task[None]] = []

    async def a_request_meanwhile() -> None:
        clients.append(asyncio.create_task(serve(waker, "mid")))  # starts mid anew, the old engine removed first
        await advance(1)

    vt.run(a_request_meanwhile())
    assert engine.held_gb == 40  # still running: its node is unreachable
    assert held(waker, "a") >= 40


def test_an_engine_found_after_boot_is_taken_over_by_a_model_whose_start_failed_meanwhile(vt: VirtualTime) -> None:
    """Found as an ERROR log of the reaper: RuntimeError("wide: can't adopt sim-18 while failed")."""
    runtime = SimRuntime(default=NORMAL)
    waker = started(vt, runtime, "big")
    vt.run(serve(waker, "big"))
    [big] = runtime.running()
    runtime.down("a")
    vt.run(waker.shutdown())
    waker = started(vt, runtime, "big")
    with pytest.raises(StartFailed, match="unreachable"):
        vt.run(serve(waker, "big"))  # a is still away
    runtime.up("a")
    vt.run(advance(OPTIONS.rediscover_interval + OPTIONS.reap_interval + 1))
    assert waker.describe().model("big").engine is big or big.state is EngineState.EXITED


def test_a_second_engine_of_a_model_found_at_boot_is_removed(vt: VirtualTime) -> None:
    """Found as an orphan: an outage of a, a restart, requests (a second sleepy engine), another restart."""
    runtime = SimRuntime(default=NORMAL)
    mid = CATALOGUE["mid"]
    launched = engine_for(mid.engine).launch_spec(mid)
    for node in ("a", "b"):  # what a previous gateway left: one engine of mid on each node
        vt.run(runtime.start(launched.model_copy(update={"placed_on": (node,)}), engine_for(mid.engine)))
    vt.run(advance(10))

    waker = started(vt, runtime, "mid")
    vt.run(advance(1))
    [engine] = runtime.running()
    assert waker.describe().model("mid").engine is engine


def test_a_start_taken_over_as_the_stop_before_it_ends_is_stopped(vt: VirtualTime) -> None:
    """Shrunk: admin_stop_while_the_engine_is_created(tiny), requests_at_once([tiny, tiny]), admin_stop(tiny)."""
    runtime = SimRuntime(default=NORMAL)
    runtime.script("tiny", dataclasses.replace(NORMAL, creation_time=20.0))
    waker = started(vt, runtime, "tiny")  # max_concurrent 1: the second request waits for the first one's slot

    async def client() -> None:
        async with waker.gate("tiny").slot():
            await serve(waker, "tiny")

    async def scenario() -> list[BaseException | None]:
        warm = asyncio.create_task(waker.warm("tiny"))
        await advance(2)
        first_stop = asyncio.create_task(waker.stop("tiny"))  # takes the start over: ends once the engine is made
        requests = [asyncio.create_task(client()) for _ in range(2)]
        second_stop = asyncio.create_task(waker.stop("tiny"))  # waits for the first stop, then stops what runs
        await asyncio.gather(first_stop, second_stop, warm)
        return list(await asyncio.gather(*requests, return_exceptions=True))

    outcomes = vt.run(scenario())
    assert all(o is None or isinstance(o, StartFailed) for o in outcomes), outcomes
    assert [e.reason for e in waker.events.recent() if e.kind == "internal_error"] == []
    vt.run(advance(10))
    assert waker.controller("tiny").state is S.STOPPED and runtime.running() == []


def test_stopping_a_sleeping_model_keeps_its_node_within_budget(vt: VirtualTime) -> None:
    """Found as "node b: 55 of 50 GB held": a sleeping engine stopped after others took the room it freed."""
    runtime = SimRuntime(default=NORMAL)
    sleepy_on_b = CATALOGUE["sleepy"].model_copy(update={"node": "b"})  # 30 GB, 4 GB asleep
    mid_on_b = CATALOGUE["mid"].model_copy(update={"node": "b"})  # 40 GB
    waker = vt.run(boot(vt, runtime, [sleepy_on_b, mid_on_b]))
    vt.run(serve(waker, "sleepy"))

    async def sleep() -> bool:
        return waker.sleep("sleepy")

    assert vt.run(sleep())
    vt.run(advance(2))
    vt.run(serve(waker, "mid"))  # in the room sleepy's sleep freed: 4 + 40 of b's 50 GB
    assert held(waker, "b") == 44
    [asleep] = [e for e in runtime.running() if e.spec.name == "sleepy"]
    asleep.behaviour.ignores_sigterm = True  # its stop takes the whole grace

    async def stop_it() -> float:
        stopping = asyncio.create_task(waker.stop("sleepy"))
        await advance(1)
        ledger = held(waker, "b")
        await stopping
        return ledger

    assert vt.run(stop_it()) <= 50


def test_an_admin_sleep_of_a_model_launched_without_sleep_mode_leaves_it_ready(vt: VirtualTime) -> None:
    """Seen in the run that showed the sleeping-stop defect: admin_sleep(wide) put an idle_action stop model to
    sleep (the world then answered sleep routes it should not have)."""
    runtime = SimRuntime(default=NORMAL)
    waker = started(vt, runtime, "wide")  # vLLM, idle_action stop
    vt.run(serve(waker, "wide"))

    async def sleep() -> bool:
        return waker.sleep("wide")

    assert vt.run(sleep()) is False
    vt.run(advance(5))
    assert waker.controller("wide").state is S.READY


def test_an_engine_made_after_its_start_was_taken_over_is_shown_while_it_stops(vt: VirtualTime) -> None:
    """Shrunk: next_start_misbehaves(big, slow_shutdown), admin_warm(big), admin_stop(big), time_passes(1)."""
    runtime = SimRuntime(default=NORMAL)
    runtime.script("big", dataclasses.replace(NORMAL, shutdown_time=3.0))
    waker = started(vt, runtime, "big")

    async def scenario() -> None:
        warm = asyncio.create_task(waker.warm("big"))
        await advance(0.1)
        stop = asyncio.create_task(waker.stop("big"))  # while the runtime makes big's engine (0.5 s)
        await advance(1)  # the engine is made, and takes 3 s to stop
        [engine] = runtime.running()
        assert waker.describe().model("big").engine is engine
        await asyncio.gather(warm, stop)

    vt.run(scenario())
