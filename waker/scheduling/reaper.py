"""The idle policy: which models have been idle long enough to stop. A pure decision."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from waker.config.durations import format_duration
from waker.config.spec import IdleAction, ModelSpec
from waker.state import ModelState


class Idle(Protocol):
    """What the idle policy reads of a model (waker.status.ModelStatus has it all)."""

    @property
    def name(self) -> str: ...
    @property
    def spec(self) -> ModelSpec: ...
    @property
    def state(self) -> ModelState: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def last_used(self) -> float | None: ...
    @property
    def ready_since(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class IdleStop:
    model: str
    reason: str
    sleep: bool = False  # idle_action sleep: release memory through the engine's API, keep it up


def idle_stops(models: Iterable[Idle], now: float) -> list[IdleStop]:
    """Models to stop now: READY, managed by us, no work in flight or waiting, idle past
    `idle_timeout` (0 = never) and up for at least `min_uptime` (guards against flapping)."""
    stops = []
    for m in models:
        spec = m.spec
        if m.state is not ModelState.READY or not spec.manages_lifecycle or spec.idle_timeout <= 0:
            continue
        if m.in_flight or m.waiting or m.last_used is None or m.ready_since is None:
            continue
        idle_for = now - m.last_used
        if idle_for >= spec.idle_timeout and now - m.ready_since >= spec.min_uptime:
            stops.append(IdleStop(m.name, f"idle for {format_duration(idle_for)} "
                                          f"(idle_timeout {format_duration(spec.idle_timeout)})",
                                  sleep=spec.idle_action is IdleAction.SLEEP))
    return stops
