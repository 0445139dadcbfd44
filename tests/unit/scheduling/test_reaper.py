"""The idle policy, decided from snapshots and a fake clock: no real waiting."""

from waker.clock import FakeClock
from waker.config.spec import ModelSpec
from waker.scheduling.reaper import idle_stops
from waker.state import ModelState
from waker.status import ModelStatus


def status(clock: FakeClock, *, state: ModelState = ModelState.READY, idle: float = 0, up: float = 1000,
           in_flight: int = 0, waiting: int = 0, **spec: object) -> ModelStatus:
    now = clock.now()
    fields = {"name": "m", "command": ["x"], "idle_timeout": "10m", "min_uptime": "1m", **spec}
    return ModelStatus(
        name=str(fields["name"]), state=state, since=now - up, in_flight=in_flight, waiting=waiting,
        last_used=now - idle, ready_since=now - up, failures=0, retry_at=None, last_error=None,
        spec=ModelSpec.model_validate(fields),
    )


def test_model_idle_past_its_timeout_is_stopped() -> None:
    clock = FakeClock()
    stops = idle_stops([status(clock, idle=600)], clock.now())
    assert [s.model for s in stops] == ["m"]
    assert stops[0].reason == "idle for 10m (idle_timeout 10m)"


def test_model_idle_less_than_its_timeout_is_kept() -> None:
    clock = FakeClock()
    assert idle_stops([status(clock, idle=599)], clock.now()) == []


def test_model_with_work_in_flight_is_never_idle() -> None:
    clock = FakeClock()
    assert idle_stops([status(clock, idle=10_000, in_flight=1)], clock.now()) == []
    assert idle_stops([status(clock, idle=10_000, waiting=1)], clock.now()) == []


def test_min_uptime_keeps_a_just_started_model_up() -> None:
    clock = FakeClock()
    fresh = status(clock, idle=30, up=30, idle_timeout="10s")
    assert idle_stops([fresh], clock.now()) == []
    clock.advance(30)
    assert [s.model for s in idle_stops([fresh], clock.now())] == ["m"]


def test_zero_idle_timeout_means_never() -> None:
    clock = FakeClock()
    assert idle_stops([status(clock, idle=10**9, idle_timeout=0)], clock.now()) == []


def test_only_ready_managed_models_are_stopped() -> None:
    clock = FakeClock()
    models = [
        status(clock, idle=10**6, state=ModelState.STARTING, name="a"),
        status(clock, idle=10**6, state=ModelState.FAILED, name="b"),
        status(clock, idle=10**6, name="c", runtime="external", url="http://h:1/v1", command=None),
        status(clock, idle=10**6, name="d"),
    ]
    assert [s.model for s in idle_stops(models, clock.now())] == ["d"]
