"""The per-model controller: states, single-flight start, leases, failures, stops."""

import asyncio

import pytest

from tests.fakes import FakeProber, FakeRuntime
from waker.clock import FakeClock
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.errors import ShuttingDown, StartFailed, StartTimeout
from waker.events import EventLog
from waker.lifecycle.controller import ModelController
from waker.options import WakerOptions
from waker.state import ModelState

S = ModelState


def make(runtime: FakeRuntime | None = None, clock: FakeClock | None = None, **spec: object):
    runtime = runtime or FakeRuntime()
    events = EventLog()
    fields = {"name": "m", "command": ["engine"], **spec}
    controller = ModelController(
        ModelSpec.model_validate(fields), engine_for("generic"), runtime, FakeProber(runtime), events,
        clock or FakeClock(), WakerOptions(log_tail_lines=5),
    )
    return controller, runtime, events


def transitions(events: EventLog) -> list[tuple[str, str]]:
    return [(e.source, e.target) for e in events.recent() if e.kind == "transition"]


async def test_cold_model_starts_once_for_concurrent_requests() -> None:
    controller, runtime, events = make(runtime=FakeRuntime(auto_ready=False))

    async def request() -> str:
        async with controller.lease() as endpoint:
            return endpoint.api_base

    requests = [asyncio.create_task(request()) for _ in range(100)]
    await runtime.started.wait()
    assert controller.state is S.STARTING
    assert controller.waiting == 100
    runtime.handles[0].ready.set()
    answers = await asyncio.gather(*requests)

    assert len(runtime.handles) == 1
    assert answers == ["http://fake-1/v1"] * 100
    assert transitions(events) == [("stopped", "starting"), ("starting", "ready")]
    assert controller.in_flight == 0 and controller.waiting == 0


async def test_lease_counts_in_flight_work_and_marks_last_use() -> None:
    clock = FakeClock()
    controller, _, _ = make(clock=clock)
    async with controller.lease():
        assert controller.in_flight == 1
        clock.advance(7)
    assert controller.in_flight == 0
    assert controller.last_used == clock.now()


async def test_engine_exit_during_start_fails_every_waiter_with_exit_code_and_log_tail() -> None:
    controller, runtime, _events = make(runtime=FakeRuntime(auto_ready=False))
    waiters = [asyncio.create_task(controller.acquire()) for _ in range(3)]
    await runtime.started.wait()
    runtime.handles[0].exit(3, "CUDA out of memory")

    results = await asyncio.gather(*waiters, return_exceptions=True)
    for result in results:
        assert isinstance(result, StartFailed)
        assert result.exit_code == 3
        assert "exited with code 3 during start" in result.message
        assert result.log_tail[-1] == "CUDA out of memory"
    assert controller.state is S.FAILED
    assert controller.waiting == 0 and controller.in_flight == 0


async def test_start_timeout_stops_the_engine_and_reports_it() -> None:
    controller, runtime, _ = make(runtime=FakeRuntime(auto_ready=False), start_timeout=0.05)
    with pytest.raises(StartTimeout, match="did not become ready within its start_timeout of 50ms"):
        await controller.acquire()
    assert runtime.handles[0].stops == 1
    assert controller.state is S.FAILED


async def test_launch_error_is_reported_as_start_failure() -> None:
    runtime = FakeRuntime()
    runtime.fail_launch = FileNotFoundError("no such file: 'vllm'")
    controller, _, _ = make(runtime=runtime)
    with pytest.raises(StartFailed, match="could not be launched: no such file"):
        await controller.acquire()
    assert controller.state is S.FAILED


async def test_failed_model_is_retried_at_once_then_backs_off() -> None:
    clock = FakeClock()
    runtime = FakeRuntime()
    runtime.fail_launch = RuntimeError("boom")
    controller, _, _ = make(runtime=runtime, clock=clock)
    with pytest.raises(StartFailed):
        await controller.acquire()
    with pytest.raises(StartFailed) as second:  # first failure: retried at once
        await controller.acquire()
    assert second.value.retry_after is None
    with pytest.raises(StartFailed) as third:  # second failure: 2 s backoff, no new attempt
        await controller.acquire()
    assert third.value.retry_after == pytest.approx(2.0)
    assert "failed 2 times in a row" in third.value.message
    assert controller.failures == 2

    runtime.fail_launch = None
    clock.advance(2.0)
    endpoint = await controller.acquire()
    assert endpoint.api_base == "http://fake-1/v1"
    assert controller.state is S.READY


async def test_crash_while_ready_moves_to_failed_and_next_request_restarts() -> None:
    controller, runtime, events = make()
    async with controller.lease():
        pass
    runtime.handles[0].exit(137, "Killed")
    await events.wait_for(lambda e: e.target == "failed", timeout=1)
    assert controller.last_error is not None
    assert controller.last_error.exit_code == 137
    assert "exited unexpectedly with code 137" in controller.last_error.reason

    async with controller.lease() as endpoint:
        assert endpoint.api_base == "http://fake-2/v1"
    assert transitions(events)[-2:] == [("failed", "starting"), ("starting", "ready")]


async def test_stop_is_graceful_and_a_later_lease_starts_again() -> None:
    controller, runtime, _events = make()
    async with controller.lease():
        pass
    await controller.stop("asked")
    assert controller.state is S.STOPPED
    assert runtime.handles[0].stops == 1
    async with controller.lease():
        assert controller.state is S.READY
    assert len(runtime.handles) == 2


async def test_idle_stop_yields_to_a_new_lease() -> None:
    controller, _, _ = make()
    async with controller.lease():
        assert controller.stop_if_idle("idle") is None
        assert controller.state is S.READY
    assert controller.stop_if_idle("idle") is not None
    assert controller.state is S.STOPPING


async def test_lease_waiting_on_a_stopping_model_starts_it_again() -> None:
    controller, runtime, _ = make()
    async with controller.lease():
        pass
    stopping = controller.stop_if_idle("idle")
    assert stopping is not None
    async with controller.lease() as endpoint:
        assert endpoint.api_base == "http://fake-2/v1"
    assert runtime.handles[0].stops == 1


async def test_closed_controller_refuses_new_leases_and_stops_its_engine() -> None:
    controller, _runtime, _ = make()
    async with controller.lease():
        pass
    await controller.close()
    assert controller.state is S.STOPPED
    with pytest.raises(ShuttingDown):
        await controller.acquire()


async def test_stop_during_start_cancels_it_and_stops_the_engine() -> None:
    controller, runtime, _ = make(runtime=FakeRuntime(auto_ready=False))
    waiter = asyncio.create_task(controller.acquire())
    await runtime.started.wait()
    await controller.stop("shutdown")
    assert controller.state is S.STOPPED
    assert runtime.handles[0].stops == 1
    with pytest.raises(StartFailed):
        await waiter


async def test_oom_kill_is_named_in_the_failure() -> None:
    controller, runtime, _ = make(runtime=FakeRuntime(auto_ready=False))
    waiter = asyncio.create_task(controller.acquire())
    await runtime.started.wait()
    runtime.handles[0].exit(137, oom=True)
    with pytest.raises(StartFailed, match=r"code 137 \(SIGKILL\), killed for lack of memory \(OOM\)"):
        await waiter


async def test_lost_runtime_fails_the_model_with_a_short_retry() -> None:
    clock = FakeClock()
    controller, runtime, events = make(clock=clock)
    for attempt in (1, 2):
        async with controller.lease():
            pass
        runtime.handles[-1].lose_track("Docker on node 'local' is unreachable")
        await events.wait_for(lambda e, n=attempt: e.target == "failed" and e.data["failures"] == n, 1)
    assert "lost track of its engine: Docker on node 'local' is unreachable" in controller.last_error.reason
    assert controller.failures == 2
    assert controller.retry_at == clock.now() + 2.0  # capped at 5 s for an unavailable runtime, not 300 s


async def test_adopted_engine_is_probed_not_restarted() -> None:
    from tests.fakes import FakeHandle

    controller, runtime, events = make()
    handle = FakeHandle(7)
    runtime.handles.append(handle)
    controller.adopt(handle)
    assert controller.state is S.STARTING
    handle.ready.set()
    async with controller.lease() as endpoint:
        assert endpoint.api_base == "http://fake-7/v1"
    assert len(runtime.handles) == 1  # nothing was launched
    assert "adopting running engine fake 7" in events.recent()[0].reason
