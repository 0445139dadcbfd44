"""One model's lifecycle, owned by one controller: state, single-flight start, leases, stop."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from waker.backoff import retry_delay
from waker.clock import Clock
from waker.durations import format_duration
from waker.engines.base import Engine
from waker.errors import ShuttingDown, StartFailed, StartTimeout
from waker.events import Event, EventLog
from waker.options import WakerOptions
from waker.probe import Prober
from waker.runtime.base import EngineHandle, Runtime
from waker.spec import ModelSpec
from waker.state import ModelState, check_transition

S = ModelState


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a leased model answers."""

    api_base: str  # e.g. http://127.0.0.1:8000/v1
    spec: ModelSpec


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    exit_code: int | None
    log_tail: tuple[str, ...]
    at: float


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A consistent snapshot of one model, for policy decisions and display."""

    name: str
    state: ModelState
    since: float
    in_flight: int
    waiting: int
    last_used: float | None
    ready_since: float | None
    failures: int
    retry_at: float | None
    last_error: Failure | None
    spec: ModelSpec


class ModelController:
    """Owns one model. All transitions happen here, each checked against the table and emitted.

    Starts are single-flight: the first caller creates the start task, every other caller awaits
    the same task, so any number of concurrent requests cause exactly one engine start
    (tests/unit/test_model.py::test_cold_model_starts_once_for_concurrent_requests).
    """

    def __init__(
        self,
        spec: ModelSpec,
        engine: Engine,
        runtime: Runtime,
        prober: Prober,
        events: EventLog,
        clock: Clock,
        options: WakerOptions,
    ) -> None:
        self.spec = spec
        self._engine = engine
        self._runtime = runtime
        self._prober = prober
        self._events = events
        self._clock = clock
        self._options = options

        self.state = S.STOPPED
        self.since = clock.now()
        self.in_flight = 0
        self.waiting = 0
        self.last_used: float | None = None
        self.ready_since: float | None = None
        self.failures = 0
        self.retry_at: float | None = None
        self.last_error: Failure | None = None
        self.handle: EngineHandle | None = None

        self._start_task: asyncio.Task[EngineHandle] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- state ---------------------------------------------------------------------------------

    def _transition(self, target: ModelState, reason: str, **data: object) -> None:
        check_transition(self.spec.name, self.state, target)
        source, self.state, self.since = self.state, target, self._clock.now()
        self._events.emit(
            Event(self._clock.wall(), self.spec.name, "transition", source, target, reason, dict(data))
        )

    def status(self) -> ModelStatus:
        return ModelStatus(
            name=self.spec.name,
            state=self.state,
            since=self.since,
            in_flight=self.in_flight,
            waiting=self.waiting,
            last_used=self.last_used,
            ready_since=self.ready_since,
            failures=self.failures,
            retry_at=self.retry_at,
            last_error=self.last_error,
            spec=self.spec,
        )

    def log_tail(self, lines: int | None = None) -> tuple[str, ...]:
        lines = self._options.log_tail_lines if lines is None else lines
        if self.handle is not None:
            return self.handle.log_tail(lines)
        return self.last_error.log_tail[-lines:] if self.last_error else ()

    # -- leases ----------------------------------------------------------------------------------

    async def acquire(self) -> Endpoint:
        """A ready endpoint, counted as in flight until `release()`; starts the engine if needed.

        The model is never idle-stopped while acquired or while an acquire waits.
        """
        self.waiting += 1
        try:
            handle = await self.ensure_ready()
            # No await between the READY check in ensure_ready and this increment: the reaper,
            # which runs on the same loop, can't slip a stop in between.
            self.in_flight += 1
        finally:
            self.waiting -= 1
        return Endpoint(handle.api_base, self.spec)

    def release(self) -> None:
        self.in_flight -= 1
        self.last_used = self._clock.now()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Endpoint]:
        """`acquire` and `release` around one request."""
        endpoint = await self.acquire()
        try:
            yield endpoint
        finally:
            self.release()

    async def ensure_ready(self) -> EngineHandle:
        while True:
            if self._closed:
                raise ShuttingDown("the gateway is shutting down", model=self.spec.name)
            if self.state is S.READY and self.handle is not None:
                return self.handle
            if self.state is S.STOPPING and self._stop_task is not None:
                await asyncio.shield(self._stop_task)
                continue
            if self.state is S.STARTING and self._start_task is not None:
                await self._join_start()
                continue
            if self.state is S.FAILED and self.retry_at is not None:
                wait = self.retry_at - self._clock.now()
                if wait > 0:
                    raise self._failure_error(retry_after=wait)
            # STARTING is entered before the task exists, with no await in between: every later
            # caller sees it and joins this start instead of making another.
            self._transition(S.STARTING, "request for a model that is not running")
            self._start_task = asyncio.create_task(self._start(), name=f"start {self.spec.name}")
            # A start nobody waits for any more (all clients left) must not log "never retrieved".
            self._start_task.add_done_callback(_consume_exception)
            await self._join_start()

    async def _join_start(self) -> None:
        task = self._start_task
        assert task is not None
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the waiter itself was cancelled (its client left)
            raise StartFailed(f"start of {self.spec.name} was cancelled", model=self.spec.name) from None

    def _failure_error(self, retry_after: float | None = None) -> StartFailed:
        failure = self.last_error
        assert failure is not None
        message = failure.reason
        if retry_after:
            message += (
                f" (failed {self.failures} times in a row; next start attempt in "
                f"{format_duration(retry_after)})"
            )
        return StartFailed(
            message,
            model=self.spec.name,
            exit_code=failure.exit_code,
            log_tail=failure.log_tail,
            retry_after=retry_after,
        )

    # -- start -----------------------------------------------------------------------------------

    async def _start(self) -> EngineHandle:
        spec = self.spec
        started = self._clock.now()
        try:
            handle = await self._runtime.start(spec, self._engine)
        except asyncio.CancelledError:
            self._fail(f"start of {spec.name} was cancelled", None, ())
            raise
        except Exception as exc:  # the runtime could not launch it at all
            self._fail(f"{spec.name} could not be launched: {exc}", None, ())
            raise self._failure_error() from exc
        self.handle = handle
        exited = asyncio.create_task(handle.wait_exit(), name=f"exit {spec.name}")
        probing = asyncio.create_task(
            self._prober.until_ready(handle.root_url, self._engine.readiness(spec), spec.upstream_name),
            name=f"probe {spec.name}",
        )
        try:
            done, _ = await asyncio.wait(
                {exited, probing}, timeout=spec.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            probing.cancel()
            exited.cancel()
            await handle.stop(spec.stop_timeout)
            self._fail(f"start of {spec.name} was cancelled", handle.exit_code, handle.log_tail(self._tail))
            raise
        probing.cancel()
        if exited in done:
            code = exited.result()
            self._fail(
                f"{spec.name} exited with code {code} during start "
                f"(after {format_duration(self._clock.now() - started)})",
                code,
                handle.log_tail(self._tail),
            )
            raise self._failure_error()
        if not done:
            exited.cancel()
            code = await handle.stop(spec.stop_timeout)
            self._fail(
                f"{spec.name} did not become ready within its start_timeout of "
                f"{format_duration(spec.start_timeout)}",
                code,
                handle.log_tail(self._tail),
            )
            failure = self._failure_error()
            raise StartTimeout(
                failure.message, model=spec.name, exit_code=code, log_tail=failure.log_tail
            )
        now = self._clock.now()
        self.ready_since = self.last_used = now
        self._transition(S.READY, "engine answered its readiness check", seconds=round(now - started, 3))
        self._watch_task = asyncio.create_task(self._watch(handle, exited), name=f"watch {spec.name}")
        return handle

    @property
    def _tail(self) -> int:
        return self._options.log_tail_lines

    def _fail(self, reason: str, exit_code: int | None, log_tail: tuple[str, ...]) -> None:
        now = self._clock.now()
        stable = self.ready_since is not None and now - self.ready_since >= self._options.stable_after
        self.failures = 1 if stable else self.failures + 1
        self.retry_at = now + retry_delay(self.failures, self._options.backoff_cap)
        self.last_error = Failure(reason, exit_code, log_tail, self._clock.wall())
        self.handle = None
        self.ready_since = None
        self._transition(
            S.FAILED, reason, exit_code=exit_code, failures=self.failures,
            retry_in=round(self.retry_at - now, 3), log_tail=list(log_tail[-10:]),
        )

    async def _watch(self, handle: EngineHandle, exited: asyncio.Task[int]) -> None:
        """A READY engine that exits on its own has crashed."""
        code = await exited
        if self.handle is handle and self.state is S.READY:
            self._fail(f"{self.spec.name} exited unexpectedly with code {code}", code, handle.log_tail(self._tail))
            await handle.stop(0.0)  # reap whatever the engine left behind in its group

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self, reason: str) -> None:
        """Stop the engine (whatever it is doing); returns when it is gone."""
        if self.state is S.STARTING and self._start_task is not None:
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartFailed):
                await self._start_task
        if self.state is S.STOPPING and self._stop_task is not None:
            await asyncio.shield(self._stop_task)
            return
        if self.state not in (S.READY, S.FAILED):
            return
        if self.state is S.FAILED and self.handle is None:
            self._transition(S.STOPPED, reason)
            return
        await asyncio.shield(self._begin_stop(reason))

    def stop_if_idle(self, reason: str) -> asyncio.Task[None] | None:
        """Start stopping only if the model is still READY with nothing in flight or waiting.

        Checked at the moment of the transition, not when the reaper decided: a lease taken in
        between must win (tests/unit/test_model.py::test_idle_stop_yields_to_a_new_lease).
        """
        if self.state is not S.READY or self.in_flight or self.waiting:
            return None
        return self._begin_stop(reason)

    def _begin_stop(self, reason: str) -> asyncio.Task[None]:
        # STOPPING is entered synchronously so no lease can see READY after this point.
        handle, self.handle, self.ready_since = self.handle, None, None
        self._transition(S.STOPPING, reason)
        self._stop_task = asyncio.create_task(self._finish_stop(handle), name=f"stop {self.spec.name}")
        return self._stop_task

    async def _finish_stop(self, handle: EngineHandle | None) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        code = await handle.stop(self.spec.stop_timeout) if handle is not None else None
        self._transition(S.STOPPED, "engine stopped", exit_code=code)

    def mark_ready_external(self, handle: EngineHandle) -> None:
        """An always-on endpoint: READY from the start, never started or stopped by us."""
        self.handle = handle
        self.ready_since = self.last_used = self._clock.now()
        self._transition(S.READY, "external endpoint, always on", url=handle.api_base)

    async def close(self) -> None:
        """Refuse new leases and stop the engine (gateway exit)."""
        self._closed = True
        if self.spec.manages_lifecycle:
            await self.stop("gateway shutting down")


def _consume_exception(task: asyncio.Task[EngineHandle]) -> None:
    if not task.cancelled():
        task.exception()
