"""Failures the simulation (tests/sim/test_simulation.py) found, shrunk and written out as plain scenarios: the
real waker over the fake world (tests/sim/world.py), in virtual time.

A scenario marked xfail(strict=True) shows a defect of the waker that is not fixed yet: it fails today (so the
suite stays green), and once the waker is fixed it passes, which strict xfail reports, so the mark comes off.
"""

import asyncio
import dataclasses

import pytest

from tests.sim.machine import CATALOGUE, NORMAL, boot
from tests.sim.vtime import VirtualTime, advance
from tests.sim.world import EngineState, SimRuntime
from waker.errors import StartFailed
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


def started(vt: VirtualTime, runtime: SimRuntime, *names: str) -> Waker:
    return vt.run(boot(vt, runtime, [CATALOGUE[name] for name in names]))


async def serve(waker: Waker, model: str, seconds: float = 0.0) -> None:
    async with waker.lease(model):
        await asyncio.sleep(seconds)


@pytest.mark.xfail(strict=True, reason="Limiter.slot (waker/gate.py): a waiter cancelled while a slot is handed "
                   "over is dropped by _hand_over, then its own clean-up removes it again: ValueError")
def test_two_clients_leaving_a_max_concurrent_model_at_one_instant_both_just_leave(vt: VirtualTime) -> None:
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


@pytest.mark.xfail(strict=True, reason="ModelController.stop (waker/lifecycle/controller.py): a stop that waited "
                   "for a stop under way takes over the start a waiting request began the moment that stop ended, "
                   "cancelling its task before it ran a step; the start's clean-up never runs, so it ends STOPPING "
                   "(internal_error) and the model is marked FAILED")
def test_a_second_stop_cancels_a_start_begun_as_the_first_stop_ended_cleanly(vt: VirtualTime) -> None:
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


@pytest.mark.xfail(strict=True, reason="Waker._adopt_running_engines (waker/waker.py) looks for engines once, at "
                   "boot, and the runtime skips unreachable nodes: an engine there runs untracked once its node is "
                   "back, holding memory the ledger does not count, and the next start runs a second engine")
def test_engines_on_a_node_unreachable_at_boot_are_tracked_once_it_is_back(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=NORMAL)
    waker = started(vt, runtime, "big", "small")
    vt.run(serve(waker, "big"))  # on a: the only node big fits
    vt.run(serve(waker, "small"))  # on b
    [big, small] = runtime.running()

    runtime.down("a")
    vt.run(waker.shutdown())
    waker = started(vt, runtime, "big", "small")  # the gateway restarts during the outage
    assert waker.describe().model("small").engine is small  # adopted: its node was reachable
    runtime.up("a")
    vt.run(advance(2))

    # Adopted once its node is back, or removed: not left running with nobody tracking it.
    assert waker.describe().model("big").engine is big or big.state is EngineState.EXITED
    vt.run(serve(waker, "big"))
    assert len([e for e in runtime.running() if e.spec.name == "big"]) == 1


def test_a_stop_while_the_runtime_creates_the_engine_leaves_nothing_running(vt: VirtualTime) -> None:
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


@pytest.mark.xfail(strict=True, reason="Waker.warm (waker/waker.py) waits in Gate.ensure_ready without counting as "
                   "waiting (Gate.acquire does, controller.waiting_for_it): the model it brings up is idle the moment "
                   "it is READY, so a model queued for its room evicts it at once; two warms of models that don't fit "
                   "together evict each other for ever and neither returns")
def test_two_warms_of_models_that_do_not_fit_together_both_end(vt: VirtualTime) -> None:
    runtime = SimRuntime(default=NORMAL)
    mid_on_a = CATALOGUE["mid"].model_copy(update={"node": "a"})  # 40 GB beside big's 70 on a's 100: no room
    waker = vt.run(boot(vt, runtime, [CATALOGUE["big"], mid_on_a]))

    async def both_warm() -> int:
        warms = [asyncio.create_task(waker.warm(name)) for name in ("big", "mid")]
        done, _ = await asyncio.wait(warms, timeout=600)
        return len(done)

    assert vt.run(both_warm()) == 2
    assert len(runtime.engines) <= 3, f"{len(runtime.engines)} engines started for two warms"


@pytest.mark.xfail(strict=True, reason="ModelController.close (waker/lifecycle/controller.py) leaves an engine of a "
                   "detached runtime running for the next gateway but keeps watching its exit: when the next waker "
                   "stops it, the closed controller marks its model FAILED and reaps the engine")
def test_a_waker_that_shut_down_leaves_the_engines_it_left_running_alone(vt: VirtualTime) -> None:
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
