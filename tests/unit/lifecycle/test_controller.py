"""One model's controller and gate inside the real waker: states, single-flight start, leases, failures, stops.

Fake engines and a fake clock; nothing here waits on real time."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.fakes import FakeEngineApi, FakeHandle, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import ShuttingDown, StartFailed, StartTimeout
from waker.events import EventLog
from waker.gate import Gate
from waker.lifecycle.backoff import retry_delay
from waker.options import WakerOptions
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


@asynccontextmanager
async def make(runtime: FakeRuntime | None = None, clock: FakeClock | None = None,
               **spec: object) -> AsyncIterator[tuple[Gate, FakeRuntime, EventLog]]:
    runtime = runtime or FakeRuntime()
    fields = {"name": "m", "command": ["engine"], "min_uptime": 0, **spec}
    waker = Waker(Registry([ModelSpec.model_validate(fields)]), runtimes={RuntimeKind.PROCESS: runtime},
                  budgets={"local": Budget(1000, 0)}, probes={"local": FixedProbe(None)}, clock=clock or FakeClock(),
                  engine_api=FakeEngineApi(runtime), options=WakerOptions(log_tail_lines=5, reap_interval=3600))
    async with waker:
        yield waker.gate("m"), runtime, waker.events


def transitions(events: EventLog) -> list[tuple[str, str]]:
    return [(e.source, e.target) for e in events.recent() if e.kind == "transition"]


async def test_cold_model_starts_once_for_concurrent_requests() -> None:
    async with make(runtime=FakeRuntime(auto_ready=False)) as (gate, runtime, events):
        async def request() -> str:
            async with gate.lease() as endpoint:
                return endpoint.api_base

        requests = [asyncio.create_task(request()) for _ in range(100)]
        await runtime.started.wait()
        assert gate.controller.state is S.STARTING
        assert gate.controller.waiting == 100
        runtime.handles[0].ready.set()
        answers = await asyncio.gather(*requests)

        assert len(runtime.handles) == 1
        assert answers == ["http://fake-1/v1"] * 100
        assert transitions(events) == [("stopped", "starting"), ("starting", "ready")]
        assert gate.controller.in_flight == 0 and gate.controller.waiting == 0


async def test_lease_counts_in_flight_work_and_marks_last_use() -> None:
    clock = FakeClock()
    async with make(clock=clock) as (gate, _, _):
        async with gate.lease():
            assert gate.controller.in_flight == 1
            clock.advance(7)
        assert gate.controller.in_flight == 0
        assert gate.controller.last_used == clock.now()


async def test_engine_exit_during_start_fails_every_waiter_with_exit_code_and_log_tail() -> None:
    async with make(runtime=FakeRuntime(auto_ready=False)) as (gate, runtime, _):
        waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
        await runtime.started.wait()
        runtime.handles[0].exit(3, "CUDA out of memory")

        results = await asyncio.gather(*waiters, return_exceptions=True)
        for result in results:
            assert isinstance(result, StartFailed)
            assert result.exit_code == 3
            assert "exited with code 3 during start" in result.message
            assert result.log_tail[-1] == "CUDA out of memory"
        assert gate.controller.state is S.FAILED
        assert gate.controller.waiting == 0 and gate.controller.in_flight == 0


async def test_start_timeout_stops_the_engine_and_reports_it() -> None:
    async with make(runtime=FakeRuntime(auto_ready=False), start_timeout=0.05) as (gate, runtime, _):
        with pytest.raises(StartTimeout, match="did not become ready within its start_timeout of 50ms"):
            await gate.acquire()
        assert runtime.handles[0].stops == 1
        assert gate.controller.state is S.FAILED


async def test_launch_error_is_reported_as_start_failure() -> None:
    runtime = FakeRuntime()
    runtime.fail_launch = FileNotFoundError("no such file: 'vllm'")
    async with make(runtime=runtime) as (gate, _, _):
        with pytest.raises(StartFailed, match="could not be launched: no such file"):
            await gate.acquire()
        assert gate.controller.state is S.FAILED


async def test_failed_model_is_retried_at_once_then_backs_off() -> None:
    clock = FakeClock()
    runtime = FakeRuntime()
    runtime.fail_launch = RuntimeError("boom")
    async with make(runtime=runtime, clock=clock) as (gate, _, _):
        with pytest.raises(StartFailed):
            await gate.acquire()
        with pytest.raises(StartFailed) as second:  # first failure: retried at once
            await gate.acquire()
        assert second.value.retry_after is None
        with pytest.raises(StartFailed) as third:  # second failure: 2 s backoff, no new attempt
            await gate.acquire()
        assert third.value.retry_after == pytest.approx(2.0)
        assert "failed 2 times in a row" in third.value.message
        assert gate.controller.failures == 2

        runtime.fail_launch = None
        clock.advance(2.0)
        endpoint = await gate.acquire()
        assert endpoint.api_base == "http://fake-1/v1"
        assert gate.controller.state is S.READY


def test_backoff_stays_capped_after_any_number_of_failures() -> None:
    # 2 ** (failures - 1) before the cap overflowed after 1025 failures: the model was stuck STARTING with 500s
    # (a client retrying through an 85-minute Docker outage gets there at the 5 s cap).
    assert retry_delay(1, 300) == 0.0
    assert retry_delay(2, 300) == 2.0
    assert retry_delay(1025, 300) == 300.0
    assert retry_delay(10**9, 5.0) == 5.0


async def test_crash_while_ready_moves_to_failed_and_next_request_restarts() -> None:
    async with make() as (gate, runtime, events):
        async with gate.lease():
            pass
        runtime.handles[0].exit(137, "Killed")
        await events.wait_for(lambda e: e.target == "failed", timeout=1)
        controller = gate.controller
        assert controller.last_error is not None
        assert controller.last_error.exit_code == 137
        assert "exited unexpectedly with code 137" in controller.last_error.reason
        await controller.settled()  # its last lines are read and its remains removed
        assert controller.last_error.log_tail[-1] == "Killed"

        async with gate.lease() as endpoint:
            assert endpoint.api_base == "http://fake-2/v1"
        assert transitions(events)[-2:] == [("failed", "starting"), ("starting", "ready")]


async def test_stop_is_graceful_and_a_later_lease_starts_again() -> None:
    async with make() as (gate, runtime, _):
        async with gate.lease():
            pass
        await gate.controller.stop("asked")
        assert gate.controller.state is S.STOPPED
        assert runtime.handles[0].stops == 1
        async with gate.lease():
            assert gate.controller.state is S.READY
        assert len(runtime.handles) == 2


async def test_idle_stop_yields_to_a_new_lease() -> None:
    async with make() as (gate, _, _):
        async with gate.lease():
            assert gate.controller.stop_if_idle("idle") is None
            assert gate.controller.state is S.READY
        assert gate.controller.stop_if_idle("idle") is not None
        assert gate.controller.state is S.STOPPING


async def test_lease_waiting_on_a_stopping_model_starts_it_again() -> None:
    async with make() as (gate, runtime, _):
        async with gate.lease():
            pass
        stopping = gate.controller.stop_if_idle("idle")
        assert stopping is not None
        async with gate.lease() as endpoint:
            assert endpoint.api_base == "http://fake-2/v1"
        assert runtime.handles[0].stops == 1


async def test_closed_controller_refuses_new_leases_and_stops_its_engine() -> None:
    async with make() as (gate, _runtime, _):
        async with gate.lease():
            pass
        await gate.controller.close()
        assert gate.controller.state is S.STOPPED
        with pytest.raises(ShuttingDown):
            await gate.acquire()


async def test_stop_during_start_cancels_it_and_stops_the_engine() -> None:
    async with make(runtime=FakeRuntime(auto_ready=False)) as (gate, runtime, _):
        waiter = asyncio.create_task(gate.acquire())
        await runtime.started.wait()
        await gate.controller.stop("shutdown")
        assert gate.controller.state is S.STOPPED
        assert runtime.handles[0].stops == 1
        with pytest.raises(StartFailed, match="start of m was cancelled: shutdown"):
            await waiter


async def test_oom_kill_is_named_in_the_failure() -> None:
    async with make(runtime=FakeRuntime(auto_ready=False)) as (gate, runtime, _):
        waiter = asyncio.create_task(gate.acquire())
        await runtime.started.wait()
        runtime.handles[0].exit(137, oom=True)
        with pytest.raises(StartFailed, match=r"code 137 \(SIGKILL\), killed for lack of memory \(OOM\)"):
            await waiter


async def test_lost_runtime_fails_the_model_with_a_short_retry() -> None:
    clock = FakeClock()
    async with make(clock=clock) as (gate, runtime, events):
        for attempt in (1, 2):
            async with gate.lease():
                pass
            runtime.handles[-1].lose_track("Docker on node 'local' is unreachable")
            await events.wait_for(lambda e, n=attempt: e.target == "failed" and e.data["failures"] == n, 1)
            await gate.controller.settled()
        controller = gate.controller
        assert controller.last_error is not None
        assert "lost track of its engine: Docker on node 'local' is unreachable" in controller.last_error.reason
        assert controller.failures == 2
        assert controller.retry_at == clock.now() + 2.0  # capped at 5 s for an unavailable runtime, not 300 s


async def test_adopted_engine_is_probed_not_restarted() -> None:
    async with make() as (gate, runtime, events):
        handle = FakeHandle(7)
        runtime.handles.append(handle)
        gate.controller.adopt(handle, ("local",))
        assert gate.controller.state is S.STARTING
        handle.ready.set()
        async with gate.lease() as endpoint:
            assert endpoint.api_base == "http://fake-7/v1"
        assert len(runtime.handles) == 1  # nothing was launched
        assert "adopting running engine fake 7" in next(e for e in events.recent() if e.kind == "transition").reason


# -- defects found by review and by the simulation: each test failed before its fix ---------------------------


async def sleeping(gate: Gate, runtime: FakeRuntime) -> FakeHandle:
    """`gate`'s model (idle_action sleep) served once and put to sleep; its engine."""
    async with gate.lease():
        pass
    task = gate.controller.sleep_if_idle("idle")
    assert task is not None
    await task
    assert gate.controller.state is S.SLEEPING and runtime.handles[0].asleep
    return runtime.handles[0]


VLLM_SLEEP = {"engine": "vllm", "model": "weights", "command": None, "idle_action": "sleep"}


async def test_stop_during_a_wake_ends_stopped_and_frees_the_memory() -> None:
    # It used to stay WAKING for good, holding memory: every later request failed and a second stop did nothing.
    async with make(**VLLM_SLEEP) as (gate, runtime, _):
        engine = await sleeping(gate, runtime)
        api: FakeEngineApi = gate.controller._api  # type: ignore[assignment]
        api.block = asyncio.Event()  # the engine is slow to answer its wake calls
        waiter = asyncio.create_task(gate.acquire())
        await gate.controller.changed().wait()
        assert gate.controller.state is S.WAKING
        await gate.controller.stop("stopped through the admin API")
        assert gate.controller.state is S.STOPPED and gate.controller.hold.value == "none"
        assert engine.stops == 1 and engine.exit_code is not None
        with pytest.raises(StartFailed, match="cancelled: stopped through the admin API"):
            await waiter
        api.block = None
        async with gate.lease() as endpoint:  # and it serves again: a new engine
            assert endpoint.api_base == "http://fake-2/v1"


async def test_a_second_stop_during_a_cancelled_start_still_ends_stopped_with_the_engine_gone() -> None:
    # The engine ignores SIGTERM, so the first stop's clean-up takes its whole grace; a second stop (or a shutdown)
    # cancelled that clean-up and left the model STARTING with its engine alive.
    async with make(runtime=FakeRuntime(auto_ready=False)) as (gate, runtime, _):
        waiter = asyncio.create_task(gate.acquire())
        await runtime.started.wait()
        engine = runtime.handles[0]
        engine.stop_gate = asyncio.Event()  # stop() waits here: SIGTERM ignored
        first = asyncio.create_task(gate.controller.stop("first"))
        await asyncio.sleep(0)
        assert gate.controller.state is S.STOPPING
        second = asyncio.create_task(gate.controller.stop("second"))
        closing = asyncio.create_task(gate.controller.close())
        await asyncio.sleep(0)
        first.cancel()  # and the first stop's caller leaves as well
        engine.stop_gate.set()  # the grace ends: killed
        await asyncio.gather(first, second, closing, return_exceptions=True)
        assert gate.controller.state is S.STOPPED
        assert engine.exit_code == 137
        with pytest.raises(StartFailed):
            await waiter


async def test_a_stop_while_the_runtime_is_unreachable_ends_failed_and_recovers_when_it_is_back() -> None:
    # An idle stop or eviction with Docker unreachable left the model STOPPING for good, and every request got a
    # 500, even after Docker was back.
    clock = FakeClock()
    runtime = FakeRuntime()
    async with make(runtime=runtime, clock=clock) as (gate, _, events):
        async with gate.lease():
            pass
        runtime.down = True
        gate.controller._options = WakerOptions(stop_retry=0.01, log_tail_lines=5)  # give up retrying at once
        stopping = gate.controller.stop_if_idle("idle")
        assert stopping is not None
        await stopping
        controller = gate.controller
        assert controller.state is S.FAILED
        assert controller.hold.value == "full"  # the engine may still run: its memory stays counted
        assert controller.last_error is not None and "could not stop m" in controller.last_error.reason
        with pytest.raises(StartFailed, match="could not stop m"):  # a clear 503 with Retry-After, not a 500
            clock.advance(-10)  # inside the backoff
            await gate.acquire()
        clock.advance(10)
        runtime.down = False
        reap = controller.begin_reap()  # what the reaper loop does every reap_interval
        assert reap is not None
        await reap
        assert controller.state is S.STOPPED
        assert [e.kind for e in events.recent()][-2:] == ["removed", "transition"]
        async with gate.lease() as endpoint:
            assert endpoint.api_base == "http://fake-2/v1"


async def test_logs_show_the_number_of_lines_asked_for() -> None:
    # `logs --lines N` ignored N for a running engine; lines=0 returned everything for a failed one.
    async with make() as (gate, runtime, events):
        async with gate.lease():
            pass
        runtime.handles[0].lines.extend(f"line {i}" for i in range(20))
        assert await gate.controller.log_tail(3) == ("line 17", "line 18", "line 19")
        assert await gate.controller.log_tail(0) == ()
        runtime.handles[0].exit(1, "the end")
        await events.wait_for(lambda e: e.target == "failed", timeout=1)
        await gate.controller.settled()
        assert await gate.controller.log_tail(0) == ()
        assert await gate.controller.log_tail(2) == ("line 19", "the end")


async def test_an_engine_that_exits_right_after_waking_is_started_cold_and_the_request_answered() -> None:
    # The crash watcher could be gone after a wake: an engine that exited as it woke stayed READY, unwatched. Now
    # the check after the wake sees it gone, and a cold start answers the request that woke it.
    async with make(**VLLM_SLEEP) as (gate, runtime, events):
        engine = await sleeping(gate, runtime)
        engine.exit_after_wake = True
        async with gate.lease() as endpoint:
            assert endpoint.api_base == "http://fake-2/v1"
        failed = [e for e in events.recent() if e.kind == "wake_failed"]
        assert len(failed) == 1 and "exited with code 1" in failed[0].reason
        assert ("waking", "starting") in transitions(events) and ("waking", "ready") not in transitions(events)
        assert gate.controller.handle is runtime.handles[1] and gate.controller.residue is None


@pytest.mark.parametrize("fault", ["stays_asleep", "garbled", "fail_calls"])
async def test_a_wake_that_leaves_the_engine_unfit_is_replaced_by_a_cold_start(fault: str) -> None:
    # Upstream wakes answer 200 and leave the engine asleep or broken (vLLM #50011, #49237): a woken engine must say
    # it no longer sleeps and generate one token, or it is stopped and started cold; the waiting request is answered.
    async with make(**VLLM_SLEEP) as (gate, runtime, events):
        engine = await sleeping(gate, runtime)
        setattr(engine, fault, True)
        waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
        endpoints = await asyncio.gather(*waiters)
        assert {e.api_base for e in endpoints} == {"http://fake-2/v1"}
        for _ in endpoints:
            gate.controller.release()
        assert engine.stops == 1 and engine.exit_code is not None  # the unfit engine is gone
        assert gate.controller.state is S.READY and len(runtime.handles) == 2
        assert gate.controller.hold.value == "full"
        reasons = [e.reason for e in events.recent() if e.kind == "wake_failed"]
        expected = {"stays_asleep": "still says it sleeps", "garbled": "does not generate",
                    "fail_calls": "answered 500"}[fault]
        assert len(reasons) == 1 and expected in reasons[0]
        if fault != "fail_calls":  # the check is a one-token completion, after the wake calls
            assert engine.calls[-1] == "POST /v1/completions" or fault == "stays_asleep"


async def test_a_wake_whose_cold_start_fails_too_fails_the_request_with_the_start_failure() -> None:
    async with make(**VLLM_SLEEP) as (gate, runtime, _):
        engine = await sleeping(gate, runtime)
        engine.garbled = True
        runtime.fail_launch = RuntimeError("image gone")
        with pytest.raises(StartFailed, match="could not be launched: image gone"):
            await gate.acquire()
        assert gate.controller.state is S.FAILED and gate.controller.hold.value == "none"
        assert engine.exit_code is not None


async def test_a_stop_during_the_cold_start_after_a_failed_wake_ends_stopped() -> None:
    runtime = FakeRuntime()
    async with make(runtime=runtime, **VLLM_SLEEP) as (gate, _, _):
        engine = await sleeping(gate, runtime)
        engine.garbled = True
        runtime.auto_ready = False
        runtime.started.clear()
        waiter = asyncio.create_task(gate.acquire())
        await runtime.started.wait()  # the cold start launched its engine, which is not ready yet
        assert gate.controller.state is S.STARTING and len(runtime.handles) == 2
        await gate.controller.stop("asked to stop")
        assert gate.controller.state is S.STOPPED and gate.controller.hold.value == "none"
        assert all(h.exit_code is not None for h in runtime.handles)
        with pytest.raises(StartFailed, match="asked to stop"):
            await waiter


SGLANG_SLEEP = {"engine": "sglang", "model": "/models/m", "command": None, "idle_action": "sleep"}


async def test_an_engine_that_cannot_tell_it_sleeps_is_noted_asleep_before_its_sleep_and_awake_after_its_wake() -> None:
    runtime = FakeRuntime()
    runtime.detached = True  # engines outlive the gateway: the next one reads the note
    async with make(runtime=runtime, **SGLANG_SLEEP) as (gate, _, _):
        engine = await sleeping(gate, runtime)
        assert engine.notes == [True]
        assert engine.calls == ["POST /flush_cache", "POST /release_memory_occupation"]  # noted before it slept
        async with gate.lease():
            pass
        assert engine.notes == [True, False]
        assert engine.calls[2:] == ["POST /resume_memory_occupation", "POST /update_weights_from_disk",
                                    "POST /v1/completions"]


async def test_an_engine_whose_sleep_cannot_be_noted_is_stopped_instead() -> None:
    # Asleep without a note, the next gateway would adopt it as ready and send requests to released memory.
    runtime = FakeRuntime()
    runtime.detached = True
    async with make(runtime=runtime, **SGLANG_SLEEP) as (gate, _, events):
        async with gate.lease():
            pass
        runtime.handles[0].fail_notes = True
        task = gate.controller.sleep_if_idle("idle")
        assert task is not None
        await task
        assert gate.controller.state is S.STOPPED
        assert runtime.handles[0].calls == [] and runtime.handles[0].exit_code is not None
        assert any("could not note" in e.reason for e in events.recent() if e.target == "stopping")


async def test_engines_that_tell_whether_they_sleep_get_no_note() -> None:
    runtime = FakeRuntime()
    runtime.detached = True
    async with make(runtime=runtime, **VLLM_SLEEP) as (gate, _, _):
        engine = await sleeping(gate, runtime)
        async with gate.lease():
            pass
        assert engine.notes == []
