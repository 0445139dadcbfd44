"""One model's lifecycle, owned by one controller: state, single-flight start, leases, stop."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from waker.clock import Clock
from waker.config.durations import format_duration
from waker.config.spec import ModelSpec
from waker.engines.base import Engine
from waker.errors import ModelNotFound, QueueFull, ShuttingDown, StartFailed, StartTimeout, WakeFailed
from waker.events import Event, EventLog
from waker.lifecycle.backoff import retry_delay
from waker.lifecycle.engine_api import Prober
from waker.options import WakerOptions
from waker.runtime.base import EngineHandle, Exit, Runtime, RuntimeUnavailable
from waker.sleep import SleepError, call_engine, launch_spec, sleep_calls, wake_calls

if TYPE_CHECKING:
    from waker.scheduling.node import Admission
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
        admission: "Admission | None" = None,
        on_change: Callable[[], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        nodes: tuple[str, ...] | None = None,
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

        # Set by each node's scheduler where others wait for this model's memory (a model spanning nodes
        # can be asked to drain by one node and not by another): the earliest deadline holds.
        self._drains: dict[str, float] = {}
        self.drain_deadline: float | None = None  # the earliest of them (read on every request)
        self.pinned = spec.pinned  # the admin API may pin or unpin at run time
        self.pending_spec: ModelSpec | None = None  # models.d changed: applied once the engine is stopped
        self.retired = False  # removed from models.d: stopped when idle, then dropped
        # Placement: the nodes it may run on, the ones it runs on (or was placed on and waits for), and,
        # for a multi-node start, the nodes whose memory is already reserved while it waits for the rest.
        self.candidates: tuple[str, ...] = nodes or (spec.home or "local",)
        self.placed: tuple[str, ...] = self.candidates if len(self.candidates) == spec.nodes else ()
        self.reserved: set[str] = set()
        self._admission = admission
        self._on_change = on_change
        self._session = session
        self._launch = launch_spec(spec)
        self._changed = asyncio.Event()
        self._sleep_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(spec.max_concurrent) if spec.max_concurrent else None
        self.slot_waiters = 0

        self._start_task: asyncio.Task[EngineHandle] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- state ---------------------------------------------------------------------------------

    def _transition(self, target: ModelState, reason: str, **data: object) -> None:
        check_transition(self.spec.name, self.state, target)
        source, self.state, self.since = self.state, target, self._clock.now()
        if target in (S.STOPPED, S.FAILED, S.SLEEPING):
            self._drains.clear()
            self.drain_deadline = None
        if target in (S.STOPPED, S.FAILED) and source is not S.FAILED:
            self.unplace()  # it holds nothing anywhere now: the next start is placed afresh
        self._events.emit(
            Event(self._clock.wall(), self.spec.name, "transition", source, target, reason, dict(data))
        )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._on_change is not None:
            self._on_change()

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

    async def log_tail(self, lines: int | None = None) -> tuple[str, ...]:
        """The engine's last output lines (of the failed run when there is none running)."""
        lines = self._options.log_tail_lines if lines is None else lines
        if self.handle is not None:
            return await self._tail_of(self.handle)
        return self.last_error.log_tail[-lines:] if self.last_error else ()

    # -- leases ----------------------------------------------------------------------------------

    @property
    def limited(self) -> bool:
        """True when `max_concurrent` bounds the requests at once (take a `concurrency_slot`)."""
        return self._slots is not None

    @contextlib.asynccontextmanager
    async def concurrency_slot(self) -> AsyncIterator[None]:
        """A place among the model's `max_concurrent` requests: wait for one, or QueueFull beyond
        `max_waiting` waiting requests (no limit when max_concurrent is unset)."""
        slots = self._slots  # this one is released, even if a reload swaps it meanwhile
        if slots is None:
            yield
            return
        if slots.locked() and self.slot_waiters >= self.spec.max_waiting:
            raise QueueFull(
                f"{self.spec.name} already runs {self.spec.max_concurrent} requests (max_concurrent) and "
                f"{self.slot_waiters} more wait (max_waiting {self.spec.max_waiting}); try again shortly",
                model=self.spec.name)
        self.slot_waiters += 1
        try:
            await slots.acquire()
        finally:
            self.slot_waiters -= 1
        try:
            yield
        finally:
            slots.release()

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
        if self.in_flight == 0 and self._on_change is not None:
            self._on_change()  # a drained model may be the victim someone waits for

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Endpoint]:
        """`acquire` and `release` around one request."""
        endpoint = await self.acquire()
        try:
            yield endpoint
        finally:
            self.release()

    async def ensure_ready(self) -> EngineHandle:
        # A request that waited for this model's start or wake is always served once it is up: only
        # new work is held back from a draining model (else two models could evict each other's
        # waiters forever: tests/unit/test_admission_properties.py with max_hold 0).
        waited_for_start = False
        while True:
            if self._closed:
                raise ShuttingDown("the gateway is shutting down", model=self.spec.name)
            if self.retired:
                raise ModelNotFound(f"The model '{self.spec.name}' was removed from models.d", model=self.spec.name)
            if self.state is S.READY and self.handle is not None:
                if waited_for_start or not self.holding_back(self._clock.now()):
                    return self.handle
                # Draining for a model that waits for room: no new work keeps it alive. Wait for it
                # to stop, then queue like everyone else (tests/unit/test_admission.py, max_hold).
                await self._changed.wait()
                continue
            if self.state is S.STOPPING and self._stop_task is not None:
                await asyncio.shield(self._stop_task)
                continue
            if self.state in (S.STARTING, S.WAKING) and self._start_task is not None:
                waited_for_start = True
                await self._join_start()
                continue
            if self.state is S.FAILED and self.retry_at is not None:
                wait = self.retry_at - self._clock.now()
                if wait > 0:
                    raise self._failure_error(retry_after=wait)
            if self.state not in (S.STOPPED, S.FAILED, S.SLEEPING):
                await self._changed.wait()  # a transient state with no task to join yet
                continue
            if self._admission is None:
                self.begin_start("request for a model that is not running")
            else:
                # The scheduler starts (or wakes) the model when there is room: then it is STARTING or
                # WAKING, and this loop joins that one start like every other waiter.
                await self._admission.admit(self)

    # -- placement -------------------------------------------------------------------------------

    def set_on_change(self, on_change: Callable[[], None] | None) -> None:
        self._on_change = on_change

    def place(self, nodes: tuple[str, ...]) -> None:
        """Bind the next start to `nodes` (chosen by the cluster admission; the first is the head)."""
        self.placed = nodes
        self.reserved.clear()

    def unplace(self) -> None:
        """Forget where it was placed (a model that may run on several nodes is placed at each start)."""
        self.reserved.clear()
        if len(self.candidates) > self.spec.nodes:
            self.placed = ()

    def admitted(self, node: str) -> None:
        """`node`'s scheduler found room: start (or wake) it, or, for a model spanning several nodes, hold
        this node's share until every one of its nodes has admitted it."""
        if not self.placed:
            self.placed = (node,)
        if len(self.placed) > 1:
            self.reserved.add(node)
            if not self.reserved.issuperset(self.placed):
                return
            self.reserved.clear()
        if self.state is S.SLEEPING:
            self.begin_wake("request for a sleeping model")
        else:
            where = f" on {', '.join(self.placed)}" if len(self.candidates) > 1 else ""
            self.begin_start(f"request for a model that is not running{where}")


    def drain_from(self, node: str) -> float | None:
        return self._drains.get(node)

    def set_drain(self, deadline: float | None, node: str = "local") -> None:
        """Set by `node`'s scheduler (None lifts it there); requests held back re-check at once."""
        if deadline is None:
            self._drains.pop(node, None)
        else:
            self._drains[node] = deadline
        self.drain_deadline = min(self._drains.values(), default=None)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def holding_back(self, now: float) -> bool:
        """True when the model takes no new work: it is draining and its hold time is over."""
        return self.drain_deadline is not None and now >= self.drain_deadline

    def begin_start(self, reason: str) -> None:
        """Enter STARTING now and launch the engine in a task that waiters join.

        STARTING is entered before the task exists, with no await in between: every later caller
        sees it and joins this start instead of making another.
        """
        self._transition(S.STARTING, reason)
        self._start_task = asyncio.create_task(self._start(), name=f"start {self.spec.name}")
        # A start nobody waits for any more (all clients left) must not log "never retrieved".
        self._start_task.add_done_callback(_consume_exception)

    def begin_wake(self, reason: str) -> None:
        self._transition(S.WAKING, reason)
        self._start_task = asyncio.create_task(self._wake(), name=f"wake {self.spec.name}")
        self._start_task.add_done_callback(_consume_exception)

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

    def adopt(self, handle: EngineHandle, nodes: tuple[str, ...] = ()) -> None:
        """Take over an engine that is already running (gateway restart) on `nodes`: it is probed like a
        fresh start, never restarted."""
        if nodes:
            self.place(nodes)
        self._transition(S.STARTING, f"adopting running engine {handle.ident}")
        self._start_task = asyncio.create_task(self._start(handle), name=f"adopt {self.spec.name}")
        self._start_task.add_done_callback(_consume_exception)

    async def _start(self, adopted: EngineHandle | None = None) -> EngineHandle:
        spec = self.spec
        started = self._clock.now()
        if adopted is not None:
            handle = adopted
        else:
            try:
                launch = self._launch.model_copy(update={"placed_on": self.placed}) if self.placed else self._launch
                handle = await self._runtime.start(launch, self._engine)
            except asyncio.CancelledError:
                self._fail(f"start of {spec.name} was cancelled", None, ())
                raise
            except RuntimeUnavailable as exc:
                self._fail(str(exc), None, (), unavailable=True)
                raise self._failure_error() from exc
            except Exception as exc:  # the runtime could not launch it at all
                self._fail(f"{spec.name} could not be launched: {exc}", None, ())
                raise self._failure_error() from exc
        self.handle = handle
        exited = asyncio.create_task(handle.wait_exit(), name=f"exit {spec.name}")
        probing = asyncio.create_task(
            self._prober.until_ready(handle.root_url, self._engine.readiness(self._launch), spec.upstream_name),
            name=f"probe {spec.name}",
        )
        try:
            done, _ = await asyncio.wait(
                {exited, probing}, timeout=spec.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            probing.cancel()
            exited.cancel()
            code = await handle.stop(spec.stop_timeout)
            self._fail(f"start of {spec.name} was cancelled", code, await self._tail_of(handle))
            raise
        probing.cancel()
        if exited in done:
            took = format_duration(self._clock.now() - started)
            reason, code = self._exit_reason(exited, "{name} exited with {exit} during start (after " + took + ")")
            self._fail(reason, code, await self._tail_of(handle), unavailable=code is None)
            raise self._failure_error()
        if not done:
            exited.cancel()
            code = await handle.stop(spec.stop_timeout)
            self._fail(
                f"{spec.name} did not become ready within its start_timeout of "
                f"{format_duration(spec.start_timeout)}",
                code,
                await self._tail_of(handle),
            )
            failure = self._failure_error()
            raise StartTimeout(failure.message, model=spec.name, exit_code=code, log_tail=failure.log_tail)
        now = self._clock.now()
        self.ready_since = self.last_used = now
        self._transition(S.READY, "engine answered its readiness check", seconds=round(now - started, 3),
                         engine=handle.ident)
        self._watch_task = asyncio.create_task(self._watch(handle, exited), name=f"watch {spec.name}")
        return handle

    def _exit_reason(self, exited: asyncio.Task[Exit], when: str) -> tuple[str, int | None]:
        try:
            end = exited.result()
        except RuntimeUnavailable as exc:
            return f"{self.spec.name}: lost track of its engine: {exc}", None
        return when.format(name=self.spec.name, exit=end.describe()), end.code

    async def _tail_of(self, handle: EngineHandle) -> tuple[str, ...]:
        try:
            return await asyncio.wait_for(handle.log_tail(self._options.log_tail_lines), timeout=5)
        except Exception as exc:  # logs are a courtesy; their absence must not hide the failure
            return (f"(engine output unavailable: {exc or type(exc).__name__})",)

    def _fail(self, reason: str, exit_code: int | None, log_tail: tuple[str, ...], unavailable: bool = False) -> None:
        now = self._clock.now()
        stable = self.ready_since is not None and now - self.ready_since >= self._options.stable_after
        self.failures = 1 if stable else self.failures + 1
        # A runtime that is down (not the engine's fault) is retried soon: it recovers on its own.
        cap = min(self._options.backoff_cap, 5.0) if unavailable else self._options.backoff_cap
        self.retry_at = now + retry_delay(self.failures, cap)
        self.last_error = Failure(reason, exit_code, log_tail, self._clock.wall())
        self.handle = None
        self.ready_since = None
        self._transition(
            S.FAILED, reason, exit_code=exit_code, failures=self.failures,
            retry_in=round(self.retry_at - now, 3), log_tail=list(log_tail[-10:]),
        )

    async def _watch(self, handle: EngineHandle, exited: asyncio.Task[Exit]) -> None:
        """A READY engine that exits on its own has crashed."""
        await asyncio.wait({exited})
        if self.handle is not handle or self.state not in (S.READY, S.SLEEPING):
            return  # stopped on purpose (or a wake in progress reports it)
        reason, code = self._exit_reason(exited, "{name} exited unexpectedly with {exit}")
        tail = await self._tail_of(handle)
        if code is not None:
            # Reap what the engine left behind (process group, container) before a retry can start.
            with contextlib.suppress(Exception):
                await handle.stop(0.0)
        if self.handle is handle and self.state in (S.READY, S.SLEEPING):
            self._fail(reason, code, tail, unavailable=code is None)

    # -- sleep and wake ----------------------------------------------------------------------------

    def sleep_if_idle(self, reason: str) -> asyncio.Task[None] | None:
        """Put an idle READY engine to sleep (its memory is released, the process stays)."""
        if self.state is not S.READY or self.in_flight or self.waiting or self.handle is None:
            return None
        self._transition(S.SLEEPING, reason, level=self.spec.sleep_level, holds_gb=self.spec.sleeping_gb)
        self._sleep_task = asyncio.create_task(self._sleep(self.handle), name=f"sleep {self.spec.name}")
        return self._sleep_task

    async def _sleep(self, handle: EngineHandle) -> None:
        assert self._session is not None, "sleep needs the waker's HTTP session"
        try:
            await call_engine(self._session, handle.root_url, sleep_calls(self.spec), self.spec.wake_timeout)
        except SleepError as exc:
            if self.state is S.SLEEPING and self.handle is handle:
                # An engine that can't sleep must not keep its memory while counted as asleep.
                await asyncio.shield(self._begin_stop(f"sleep failed ({exc}); stopping instead"))

    async def _wake(self) -> EngineHandle:
        spec, handle, started = self.spec, self.handle, self._clock.now()
        assert handle is not None and self._session is not None
        if self._sleep_task is not None:
            with contextlib.suppress(Exception):
                await self._sleep_task  # never wake an engine that is still falling asleep
        try:
            await call_engine(self._session, handle.root_url, wake_calls(spec), spec.wake_timeout)
        except SleepError as exc:
            if self.state is S.WAKING and self.handle is handle:
                await self._stop_after_failure(handle, f"{spec.name} could not be woken: {exc}")
            raise WakeFailed(f"{spec.name} could not be woken: {exc}", model=spec.name) from None
        now = self._clock.now()
        self.ready_since = self.last_used = now
        self._transition(S.READY, "engine woke up", seconds=round(now - started, 3))
        return handle

    async def _stop_after_failure(self, handle: EngineHandle, reason: str) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        with contextlib.suppress(Exception):
            await handle.stop(self.spec.stop_timeout)
        self._fail(reason, handle.exit_code, await self._tail_of(handle))

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
        if self.state is S.WAKING and self._start_task is not None:
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartFailed):
                await self._start_task
        if self.state not in (S.READY, S.FAILED, S.SLEEPING):
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
        if self.state not in (S.READY, S.SLEEPING) or self.in_flight:
            return None
        if self.waiting and not self.holding_back(self._clock.now()):
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
        self.apply_pending_spec()

    def apply_pending_spec(self) -> bool:
        """Take the new models.d entry while no engine runs (the next start uses it)."""
        if self.pending_spec is None or self.state not in (S.STOPPED, S.FAILED):
            return False
        self.replace_spec(self.pending_spec)
        self.pending_spec = None
        self._events.emit(Event(self._clock.wall(), self.spec.name, "reconfigured", reason="models.d changed"))
        return True

    def replace_spec(self, spec: ModelSpec) -> None:
        """A new entry for this model: policy fields apply at once; engine-shaping ones at the next start."""
        self.spec = spec
        self._launch = launch_spec(spec)
        self.pinned = spec.pinned
        self._slots = asyncio.Semaphore(spec.max_concurrent) if spec.max_concurrent else None

    def mark_ready_external(self, handle: EngineHandle) -> None:
        """An always-on endpoint: READY from the start, never started or stopped by us."""
        self.handle = handle
        self.ready_since = self.last_used = self._clock.now()
        self._transition(S.READY, "external endpoint, always on", url=handle.api_base)

    async def close(self) -> None:
        """Refuse new leases; stop the engine unless it outlives the gateway (containers are left
        running, to be adopted by the next gateway instead of restarted)."""
        self._closed = True
        if self._runtime.detached:
            if self._start_task is not None and not self._start_task.done():
                self._start_task.cancel()  # a half-started engine is not worth keeping
                with contextlib.suppress(asyncio.CancelledError, StartFailed):
                    await self._start_task
            return
        await self.stop("gateway shutting down")


def _consume_exception(task: asyncio.Task[EngineHandle]) -> None:
    if not task.cancelled():
        task.exception()
