"""One model's engine over time, owned by one controller.

The rule: a model's lifecycle fields are written only by its controller, either synchronously when an
operation begins (entering its state with no await between the check and the write) or by that operation's
task; operations never overlap (a stop takes over a start, wake or sleep in progress by cancelling it, once;
a wake waits for the engine to finish falling asleep; a start waits for the removal of a previous engine),
and every operation task ends in a stable state (READY, SLEEPING, STOPPED or FAILED) whether it succeeds,
fails or is cancelled, its clean-up shielded from further cancellation. So a model is never STARTING, WAKING
or STOPPING without a live task that ends it within its timeout: the simulation checks it after every step
(tests/sim/test_simulation.py).

What the controller does not know: where a model may run, what the budget holds, drains and pins. Those are
scheduling state (waker/scheduling); the scheduler tells the controller where to start, and the controller
reports every transition through `on_change`.
"""

import asyncio
import contextlib
import logging
import statistics
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from enum import StrEnum
from typing import TypeVar

from waker.clock import Clock
from waker.config.durations import format_duration
from waker.config.spec import IdleAction, ModelSpec
from waker.engines.base import Engine, generation_check
from waker.errors import StartFailed, StartTimeout
from waker.events import Event, EventLog
from waker.lifecycle.backoff import retry_delay
from waker.lifecycle.engine_api import EngineApi, EngineCallError
from waker.options import WakerOptions
from waker.runtime.base import EngineHandle, Exit, Runtime, RuntimeUnavailable, SleepNotes
from waker.state import TRANSITIONAL, Hold, ModelState, check_transition
from waker.status import Failure

S = ModelState
T = TypeVar("T")
log = logging.getLogger("sparkgate.lifecycle")

# How many of a model's latest starts (and, apart, wakes) its typical duration is the median of: recent enough to
# follow a change (weights now cached on disk), enough that one odd start does not move it.
HISTORY = 5


class Op(StrEnum):
    START = "start"  # launch (or adopt) and probe until ready
    WAKE = "wake"
    SLEEP = "sleep"
    STOP = "stop"
    REAP = "reap"  # remove what is left of an engine that failed (the model stays FAILED, or becomes STOPPED)


class EngineExited(Exception):
    def __init__(self, watch: "asyncio.Future[Exit]") -> None:
        super().__init__("the engine exited")
        self.watch = watch


class ModelController:
    """Owns one model's engine; see the module docstring for the rule every method follows."""

    def __init__(self, spec: ModelSpec, engine: Engine, runtime: Runtime, api: EngineApi, events: EventLog,
                 clock: Clock, options: WakerOptions, on_change: Callable[[], None] | None = None) -> None:
        self._spec = spec
        self._engine = engine
        self._runtime = runtime
        self._api = api
        self._events = events
        self._clock = clock
        self._options = options
        self._on_change = on_change

        self._state = S.STOPPED
        self._since = clock.now()
        self._handle: EngineHandle | None = None  # the engine it runs (from launch until it is stopped)
        self._exit: asyncio.Future[Exit] | None = None  # that engine's end, watched once for its whole life
        self._residue: EngineHandle | None = None  # FAILED: what is left of an engine, removed before a new start
        self._residue_running = False  # ... which may still run (its stop failed, or we lost track of it)
        self._asleep = False  # its engine answered its sleep calls (holds its sleeping footprint) and was not woken
        self._placed: tuple[str, ...] = ()
        self._in_flight = 0
        self._waiting = 0
        self._last_used: float | None = None
        self._ready_since: float | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._last_error: Failure | None = None
        self._pending: ModelSpec | None = None  # models.d changed its engine: applied once no engine runs
        self._retired = False
        self._closed = False

        self._op: asyncio.Task[object] | None = None
        self._op_kind: Op | None = None
        self._start_op: asyncio.Task[EngineHandle] | None = None  # the latest start or wake (requests join it)
        self._starts = 0  # starts and wakes begun so far
        self._stop_reason: str | None = None  # why the running operation was taken over by a stop
        self._changed = asyncio.Event()
        # How long its latest successful starts and wakes took, launch (or wake calls) to READY: what a request that
        # waits is told to expect (gateway/progress.py, gateway/hints.py). Not lifecycle state: nothing decides on it.
        self._start_durations: deque[float] = deque(maxlen=HISTORY)
        self._wake_durations: deque[float] = deque(maxlen=HISTORY)

    # -- reading -------------------------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def state(self) -> ModelState:
        return self._state

    @property
    def since(self) -> float:
        return self._since

    @property
    def handle(self) -> EngineHandle | None:
        return self._handle

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def last_used(self) -> float | None:
        return self._last_used

    @property
    def ready_since(self) -> float | None:
        return self._ready_since

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def retry_at(self) -> float | None:
        return self._retry_at

    @property
    def last_error(self) -> Failure | None:
        return self._last_error

    @property
    def placed(self) -> tuple[str, ...]:
        return self._placed

    @property
    def pending_spec(self) -> ModelSpec | None:
        return self._pending

    @property
    def retired(self) -> bool:
        return self._retired

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def starts(self) -> int:
        """Starts and wakes begun so far: a request admitted for a start joins the one begun after it asked."""
        return self._starts

    @property
    def typical_start_s(self) -> float | None:
        """The median of its latest successful cold starts (to READY, as measured by the start itself: removing
        what an earlier engine left, launching, loading), None before its first one. An engine adopted at boot is no
        start of ours and is left out. Kept while the controller lives: across reloads that leave the engine as it
        is, and reset by an entry that reshapes the engine (`_apply_pending`)."""
        return statistics.median(self._start_durations) if self._start_durations else None

    @property
    def typical_wake_s(self) -> float | None:
        """The median of its latest successful wakes (wake calls and the check after), None before its first one.
        A wake that failed and became a cold start counts as a start."""
        return statistics.median(self._wake_durations) if self._wake_durations else None

    @property
    def operation(self) -> asyncio.Task[object] | None:
        """The operation running now, if any."""
        return self._running()

    def _running(self) -> asyncio.Task[object] | None:
        # An operation that has returned has written its outcome; its done-callback may not have run yet.
        op = self._op
        return op if op is not None and not op.done() else None

    @property
    def residue(self) -> EngineHandle | None:
        return self._residue

    @property
    def engine(self) -> EngineHandle | None:
        """The engine it runs, or what is left of one that failed (for readers: logs, memory, the sampler)."""
        return self._handle or self._residue

    @property
    def hold(self) -> Hold:
        """What its engine holds of its footprint in the ledger: an engine asleep holds its sleeping footprint,
        also while it is being stopped (a stop never makes it take more); one still falling asleep holds it all."""
        state = self._state
        engine = Hold.SLEEPING if self._asleep else Hold.FULL
        if state in (S.SLEEPING, S.STOPPING):
            return engine
        if state in (S.STARTING, S.WAKING, S.READY):
            return Hold.FULL
        if state is S.FAILED and self._residue is not None:
            return engine  # what an engine left (the other parts of a group, a process group): counted until gone
        return Hold.NONE

    @property
    def can_sleep(self) -> bool:
        """Its engine was launched in sleep mode (idle_action sleep, on an engine that has one): a vLLM engine
        started without it has no sleep routes at all."""
        return self._spec.idle_action is IdleAction.SLEEP and self._engine.supports_sleep

    def changed(self) -> asyncio.Event:
        """Set at the next transition."""
        return self._changed

    def failure_error(self, retry_after: float | None = None) -> StartFailed:
        failure = self._last_error
        assert failure is not None
        message = failure.reason
        if retry_after:
            message += (f" (failed {self._failures} times in a row; next start attempt in "
                        f"{format_duration(retry_after)})")
        return StartFailed(message, model=self.name, exit_code=failure.exit_code, log_tail=failure.log_tail,
                           retry_after=retry_after)

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        """The engine's last `lines` output lines (of the failed run when none runs)."""
        if lines <= 0:
            return ()
        if self._handle is not None:
            return await self._tail(self._handle, lines)
        return self._last_error.log_tail[-lines:] if self._last_error else ()

    # -- leases (requests) ------------------------------------------------------------------------------

    def take(self) -> EngineHandle | None:
        """Count one request in flight if the engine is READY (no await between the check and the count, so no
        stop can slip in between: tests/unit/lifecycle/test_controller.py::test_idle_stop_yields_to_a_new_lease)."""
        if self._state is S.READY and self._handle is not None and not (self._retired or self._closed):
            self._in_flight += 1
            return self._handle
        return None

    def release(self) -> None:
        self._in_flight -= 1
        self._last_used = self._clock.now()
        if self._in_flight == 0 and self._on_change is not None:
            self._on_change()  # a drained model may be the victim someone waits for

    @contextlib.contextmanager
    def waiting_for_it(self) -> Iterator[None]:
        """Count a request that waits for the model (joining its start, queued, held back): it is not idle."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    async def join_start(self, after: int | None = None) -> None:
        """Wait for the latest start or wake to end (only one begun after `after` starts, when given: the one a
        request was admitted for, which may have ended already); StartFailed if it failed or was cancelled."""
        task = self._start_op
        if task is None or (after is not None and self._starts <= after):
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the waiter itself was cancelled (its client left)
            why = self._stop_reason or "it was stopped"
            raise StartFailed(f"start of {self.name} was cancelled: {why}", model=self.name) from None

    async def settled(self) -> None:
        """Wait until no operation runs (its outcome is in the state)."""
        while (op := self._running()) is not None:
            await _settled(op)

    # -- operations -------------------------------------------------------------------------------------

    def begin_start(self, placed: tuple[str, ...] = (), reason: str = "request for a model that is not running") \
            -> bool:
        """Enter STARTING now and launch the engine (on `placed`, head first) in a task that requests join; False
        when it can't start (retired, closed, or not stopped or failed)."""
        if self._closed or self._retired or self._state not in (S.STOPPED, S.FAILED):
            return False
        prior = self._running()  # the removal of what an earlier engine left, still running
        self._placed = placed
        self._stop_reason = None
        self._starts += 1
        self._transition(S.STARTING, reason)
        self._start_op = self._run(Op.START, self._start(prior, None))
        return True

    def begin_wake(self, reason: str = "request for a sleeping model") -> bool:
        if self._closed or self._retired or self._state is not S.SLEEPING or self._handle is None:
            return False
        prior = self._running() if self._op_kind is Op.SLEEP else None  # never wake an engine still falling asleep
        self._stop_reason = None
        self._asleep = False  # it takes its memory back from now on
        self._starts += 1
        self._transition(S.WAKING, reason)
        self._start_op = self._run(Op.WAKE, self._wake(prior))
        return True

    def adopt(self, handle: EngineHandle, placed: tuple[str, ...] = (), sleeping: bool = False) -> None:
        """Take over an engine left running by an earlier gateway on `placed`: probed like a fresh start (never
        restarted), or SLEEPING at once when it sleeps."""
        if not self.idle_stopped:
            raise RuntimeError(f"{self.name}: can't adopt {handle.ident} while {self._state}")
        self._placed = placed
        self._watch(handle)  # its engine from now on (the sampler and the ledger see it at once)
        if sleeping:
            self._last_used = self._clock.now()
            self._asleep = True
            self._transition(S.SLEEPING, f"adopting sleeping engine {handle.ident}")
            return
        self._starts += 1
        self._transition(S.STARTING, f"adopting running engine {handle.ident}")
        self._start_op = self._run(Op.START, self._start(None, handle))

    def mark_external(self, handle: EngineHandle) -> None:
        """An always-on endpoint: READY from the start, never started or stopped by us."""
        self._handle = handle
        self._ready_since = self._last_used = self._clock.now()
        self._transition(S.READY, "external endpoint, always on", url=handle.api_base)

    def sleep_if_idle(self, reason: str) -> "asyncio.Task[object] | None":
        """Put an idle READY engine to sleep (its memory is released, the process stays); None if it is not idle
        or its engine has no sleep mode."""
        if (self._state is not S.READY or self._in_flight or self._waiting or self._handle is None
                or self._running() is not None or not self.can_sleep):
            return None
        spec = self._spec
        self._transition(S.SLEEPING, reason, level=spec.sleep_level, holds_gb=spec.sleeping_gb)
        return self._run(Op.SLEEP, self._sleep(self._handle))

    def stop_if_idle(self, reason: str, ignore_waiting: bool = False) -> "asyncio.Task[object] | None":
        """Begin stopping only if the model is READY or SLEEPING with nothing in flight (nor waiting, unless
        `ignore_waiting`: requests held back by a drain). Checked at the moment of the transition, not when
        the caller decided: a lease taken in between wins (test_idle_stop_yields_to_a_new_lease)."""
        if self._state not in (S.READY, S.SLEEPING) or self._in_flight or self._running() is not None:
            return None
        if self._waiting and not ignore_waiting:
            return None
        return self._begin_stop(reason)

    async def stop(self, reason: str) -> None:
        """Stop the engine, whatever it is doing; returns once it is gone (STOPPED), or FAILED when the runtime
        can't be reached to stop it (the waker's reaper retries the removal)."""
        for _ in range(4):  # each round awaits an operation or begins one; three are the most it takes
            op = self._running()
            if self._state is S.STOPPED:
                return
            if op is not None and (self._state in (S.STARTING, S.WAKING)
                                   or (self._state is S.SLEEPING and self._op_kind is Op.SLEEP)):
                # Take the running operation over, once: its own clean-up stops the engine (it finds STOPPING).
                self._stop_reason = reason
                self._transition(S.STOPPING, reason)
                op.cancel()
                await _settled(op)
            elif op is not None:  # a stop or a removal under way (or a taken-over one): its outcome is ours
                await _settled(op)
            elif self._state in (S.READY, S.SLEEPING):
                await _settled(self._begin_stop(reason))
            elif self._state is S.FAILED and self._residue is not None:
                reap = self.begin_reap()
                if reap is not None:
                    await _settled(reap)
                return  # one attempt: if the runtime is still away, the reaper tries again later
            elif self._state is S.FAILED:
                self._transition(S.STOPPED, reason)
                return

    def begin_reap(self) -> "asyncio.Task[object] | None":
        """Remove what a failed engine left (a container, a process group, or an engine whose stop failed); None if
        there is nothing to remove or an operation runs."""
        if self._state is not S.FAILED or self._residue is None or self._running() is not None:
            return None
        return self._run(Op.REAP, self._reap(self._residue, with_tail=False))

    async def close(self) -> None:
        """Refuse new work and stop the engine, unless it outlives the gateway (containers are left running, to be
        adopted by the next gateway instead of restarted; a half-started one is not worth keeping)."""
        self._closed = True
        if self._runtime.detached:
            if self._state in (S.STARTING, S.WAKING):
                await self.stop("gateway shutting down: a half-started engine is not kept")
            await self.settled()
            # The engine is the next gateway's now: its end is no longer ours to report or reap (a closed
            # controller used to mark its model FAILED and remove the engine the next gateway had adopted).
            self._forget_exit()
            return
        await self.stop("gateway shutting down")

    # -- models.d changes -------------------------------------------------------------------------------

    def replace_spec(self, spec: ModelSpec) -> None:
        """A new entry whose engine is the same (policy only): it applies at once."""
        self._spec = spec

    def set_pending(self, spec: ModelSpec | None) -> None:
        """A new entry that shapes the engine differently: used from the next start (applied once none runs)."""
        self._pending = spec
        self.apply_pending()

    def apply_pending(self) -> bool:
        """Take the pending entry if no engine runs now (the next start uses it)."""
        return self.idle_stopped and self._apply_pending()

    def _apply_pending(self) -> bool:
        # Also called by an operation as it ends (a stop): the engine is gone, the next start is not begun yet.
        if self._pending is None or not self.engine_gone:
            return False
        self._spec, self._pending = self._pending, None
        self._start_durations.clear()  # another engine: its starts say nothing of the new one's
        self._wake_durations.clear()
        self._events.emit(Event(self._clock.wall(), self.name, "reconfigured", reason="models.d changed"))
        self._notify()  # the scheduling side follows the new entry (nodes, footprint)
        return True

    @property
    def engine_gone(self) -> bool:
        """No engine runs or is left (STOPPED, or FAILED with nothing to remove)."""
        return self._state in (S.STOPPED, S.FAILED) and self._residue is None

    @property
    def idle_stopped(self) -> bool:
        """No engine runs or is left, and no operation runs."""
        return self.engine_gone and self._running() is None

    def retire(self, retired: bool = True) -> None:
        """Removed from models.d (or added back): a retired model takes no new work."""
        self._retired = retired

    # -- the operations' tasks ----------------------------------------------------------------------------

    def _run(self, kind: Op, coro: Awaitable[T]) -> "asyncio.Task[T]":
        task: asyncio.Task[T] = asyncio.ensure_future(coro)  # type: ignore[assignment]
        task.set_name(f"{kind} {self.name}")
        self._op, self._op_kind = task, kind  # type: ignore[assignment]
        task.add_done_callback(self._op_ended)
        return task

    def _op_ended(self, task: "asyncio.Task[object]") -> None:
        if not task.cancelled():
            task.exception()  # retrieved: whoever cares joined the task
        if self._op is not task:
            return  # superseded (a wake that took over a sleep)
        kind, self._op, self._op_kind = self._op_kind, None, None
        if self._state in TRANSITIONAL:
            # Every operation ends in a stable state, except one a stop took over before it ran a single step:
            # cancelled before it began, its own clean-up never ran. A stop operation ends it now (the engine,
            # if any, is stopped; tests/sim/test_regressions.py). Anything else left behind is a bug, reported.
            if not task.cancelled():
                log.error("%s: %s operation ended in %s", self.name, kind, self._state)
                self._events.emit(Event(self._clock.wall(), self.name, "internal_error",
                                        reason=f"{kind} ended in {self._state}"))
            if self._state is not S.STOPPING:
                self._transition(S.STOPPING, f"the {kind} of {self.name} ended while {self._state}")
            self._run(Op.STOP, _finish(self._end(self._handle)))
            return
        if self._state is S.SLEEPING and kind is Op.SLEEP:
            self._notify()  # it holds only its sleeping footprint from now on
        self._check_exit()

    async def _start(self, prior: "asyncio.Task[object] | None", adopted: EngineHandle | None) -> EngineHandle:
        spec = self._spec
        started = self._clock.now()
        handle = adopted
        limit = asyncio.timeout(spec.start_timeout)
        try:
            if prior is not None:
                await _settled(prior)
            async with limit:
                if adopted is None:
                    if self._residue is not None:
                        await self._dispose(self._residue, self._grace_for_residue())
                        self._residue, self._residue_running = None, False
                    launching = asyncio.ensure_future(self._runtime.start(self._launch_spec(), self._engine))
                    try:
                        handle = await asyncio.shield(launching)
                    except asyncio.CancelledError:
                        # Cancelled while the runtime creates it: what it makes is stopped below, never untracked.
                        handle = await _result_of(launching)
                        raise
                if handle is not self._handle:
                    self._watch(handle)
                await self._race(self._api.until_ready(handle.root_url, self._engine.readiness(spec),
                                                       spec.upstream_name), handle)
        except asyncio.CancelledError:
            await _finish(self._after_cancel(handle))
            raise
        except EngineExited as exc:
            took = format_duration(self._clock.now() - started)
            await _finish(self._after_exit(exc.watch, handle, "{name} exited with {exit} during start (after "
                                           + took + ")"))
            raise self.failure_error() from None
        except RuntimeUnavailable as exc:
            await _finish(self._after_failure(handle, str(exc), unavailable=True))
            raise self.failure_error() from None
        except TimeoutError:
            if not limit.expired():
                raise
            await _finish(self._after_failure(handle, f"{spec.name} did not become ready within its start_timeout "
                                              f"of {format_duration(spec.start_timeout)}"))
            failure = self.failure_error()
            raise StartTimeout(failure.message, model=spec.name, exit_code=failure.exit_code,
                               log_tail=failure.log_tail) from None
        except Exception as exc:  # the runtime could not launch it at all
            reason = f"{spec.name} could not be launched: {exc}" if handle is None else f"{spec.name}: {exc}"
            await _finish(self._after_failure(handle, reason))
            raise self.failure_error() from None
        now = self._clock.now()
        self._ready_since = self._last_used = now
        if adopted is None:
            self._start_durations.append(now - started)
        self._transition(S.READY, "engine answered its readiness check", seconds=round(now - started, 3),
                         engine=handle.ident)
        return handle

    async def _wake(self, prior: "asyncio.Task[object] | None") -> EngineHandle:
        """Wake the engine and check it generates; an engine that can't be woken, or is broken after its wake, is
        stopped and started cold in the same operation (the requests that wait for it are answered by that start)."""
        spec, handle, started = self._spec, self._handle, self._clock.now()
        assert handle is not None
        limit = asyncio.timeout(spec.wake_timeout)  # one deadline for the whole wake: its calls and the check
        why: str | None = None
        try:
            async with limit:
                if prior is not None:
                    await _settled(prior)
                await self._race(self._api.call(handle.root_url, self._engine.wake_calls(spec), spec.wake_timeout),
                                 handle)
                why = await self._race(self._awake_problem(handle, limit), handle)
                if why is None:
                    await self._note_asleep(handle, False)
        except asyncio.CancelledError:
            if prior is not None:
                prior.cancel()
            await _finish(self._after_cancel(handle))
            raise
        except EngineExited as exc:
            why, _ = self._exit_reason(exc.watch, "it exited with {exit} while waking")
        except (EngineCallError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and not limit.expired():
                raise
            why = f"no answer within its wake_timeout of {format_duration(spec.wake_timeout)}" \
                if isinstance(exc, TimeoutError) else str(exc)
        if why is not None:
            return await self._start_after_failed_wake(handle, why)
        now = self._clock.now()
        self._ready_since = self._last_used = now
        self._wake_durations.append(now - started)
        self._transition(S.READY, "engine woke up", seconds=round(now - started, 3))
        return handle

    async def _awake_problem(self, handle: EngineHandle, limit: asyncio.Timeout) -> str | None:
        """What is wrong with an engine that answered its wake calls, or None: it must say it no longer sleeps (where
        it can tell) and generate one token."""
        spec = self._spec
        state_call = self._engine.sleep_state_call(spec)
        if state_call is not None:
            sleeping = await self._api.is_sleeping(handle.root_url, state_call)
            if sleeping is not False:
                return "it still says it sleeps" if sleeping else "it does not say whether it still sleeps"
        when = limit.when()
        left = spec.wake_timeout if when is None else max(0.001, when - asyncio.get_running_loop().time())
        try:
            await self._api.call(handle.root_url, (generation_check(spec),), left)
        except EngineCallError as exc:
            return f"it does not generate after its wake ({exc})"
        return None

    async def _start_after_failed_wake(self, handle: EngineHandle, why: str) -> EngineHandle:
        """The wake failed: its engine goes (what is left of it is removed first thing by the start) and a cold start
        takes the operation over, holding the same memory (STARTING, like WAKING, holds the full footprint)."""
        spec = self._spec
        log.warning("%s: wake failed (%s); starting it cold", spec.name, why)
        self._events.emit(Event(self._clock.wall(), spec.name, "wake_failed", reason=why))
        exited = self._exit is not None and self._exit.done()
        self._handle = None
        self._forget_exit()
        self._residue, self._residue_running = handle, not exited
        self._op_kind = Op.START
        self._transition(S.STARTING, f"could not be woken ({why}): starting it cold")
        return await self._start(None, None)  # its failure is the request's answer (the event log says why it ran)

    async def _sleep(self, handle: EngineHandle) -> None:
        spec = self._spec
        me = asyncio.current_task()
        try:
            try:
                await self._note_asleep(handle, True)  # before the calls: a gateway that dies meanwhile errs on the
            except Exception as exc:                    # side of "asleep", which a wake's check corrects
                raise EngineCallError(f"could not note on its engine that it sleeps: {exc}") from exc
            await asyncio.wait_for(self._race(
                self._api.call(handle.root_url, self._engine.sleep_calls(spec), spec.wake_timeout), handle),
                spec.wake_timeout)
            if self._op is me:
                self._asleep = True
        except asyncio.CancelledError:
            if self._state is S.STOPPING and self._op is me:
                await _finish(self._after_cancel(handle))
            raise
        except EngineExited as exc:
            if self._op is me:
                await _finish(self._after_exit(exc.watch, handle, "{name} exited with {exit} while falling asleep"))
        except (EngineCallError, TimeoutError) as exc:
            if self._op is me and self._state is S.SLEEPING:
                # An engine that can't sleep must not keep its memory while counted as asleep.
                self._transition(S.STOPPING, f"sleep failed ({exc or 'no answer'}); stopping instead")
                await _finish(self._end(handle))

    async def _note_asleep(self, handle: EngineHandle, asleep: bool) -> None:
        """Keep with an engine that outlives the gateway whether it sleeps, when it can't tell itself (SGLang): the
        next gateway adopts it as it is (waker.Waker._is_sleeping). Noting "asleep" may fail (the caller does not
        put it to sleep then); noting "awake" is best effort (a wrong "asleep" costs the next gateway a cold start)."""
        if not (self._runtime.detached and isinstance(handle, SleepNotes)
                and self._engine.sleep_state_call(self._spec) is None):
            return
        if asleep:
            await handle.note_asleep(True)
            return
        try:
            await handle.note_asleep(False)
        except Exception as exc:
            log.warning("%s: could not note on its engine that it is awake: %s", self.name, exc)

    def _begin_stop(self, reason: str) -> "asyncio.Task[object]":
        # STOPPING is entered synchronously so no lease can see READY after this point.
        handle = self._handle
        self._ready_since = None
        self._transition(S.STOPPING, reason)
        return self._run(Op.STOP, _finish(self._end(handle)))

    async def _reap(self, residue: EngineHandle, with_tail: bool) -> None:
        if with_tail and self._last_error is not None:
            tail = await self._tail(residue, self._options.log_tail_lines)
            self._last_error = replace(self._last_error, log_tail=tail)
        running = self._residue_running
        try:
            await self._dispose(residue, self._grace_for_residue())
        except Exception as exc:  # still unreachable: kept, and tried again by the reaper
            log.info("%s: could not remove what its engine left yet: %s", self.name, exc)
            return
        if self._residue is residue:
            self._residue, self._residue_running = None, False
            self._forget_exit()
            self._events.emit(Event(self._clock.wall(), self.name, "removed", reason=f"{residue.ident} removed"))
            if running and self._state is S.FAILED:
                self._transition(S.STOPPED, "the engine whose stop had failed is gone now")
            else:
                self._notify()  # its memory is free now
            self._apply_pending()

    # -- clean-up paths (each run to its end, whatever else is cancelled meanwhile) ------------------------

    async def _after_cancel(self, handle: EngineHandle | None) -> None:
        """A stop took the operation over (the state is STOPPING): the engine goes, then STOPPED."""
        if self._state is not S.STOPPING:  # not a stop: the gateway's loop is going away; still end stable
            self._transition(S.STOPPING, f"{self._op_kind or 'operation'} of {self.name} was cancelled")
        await self._end(handle)

    async def _end(self, handle: EngineHandle | None) -> None:
        """Stop `handle` (STOPPING), and what an earlier engine left if anything, then STOPPED; FAILED, keeping
        the engine to remove later, when the runtime can't be reached (its memory may still be held: the ledger
        keeps counting it)."""
        code = None
        if handle is not None and self._handle is None:
            self._handle = handle  # made just as its start was taken over: shown (logs, memory) while it stops
        for engine in (handle, self._residue):
            if engine is None:
                continue
            try:
                stopped = await self._dispose(engine, self._spec.stop_timeout)
            except Exception as exc:
                self._residue, self._residue_running = engine, True
                if self._handle is handle:
                    self._handle = None
                self._fail(f"could not stop {self.name}: {exc}; its engine may still hold memory and is removed as "
                           "soon as the runtime answers", None, (), unavailable=isinstance(exc, RuntimeUnavailable))
                return
            if engine is handle:
                code = stopped
            else:
                self._residue, self._residue_running = None, False
        if self._handle is handle:
            self._handle = None
        self._forget_exit()
        self._transition(S.STOPPED, "engine stopped", exit_code=code)
        self._apply_pending()

    async def _after_failure(self, handle: EngineHandle | None, reason: str, unavailable: bool = False) -> None:
        """A start or wake failed: stop the engine if one was launched, then FAILED with its last lines."""
        code, tail = None, ()
        if handle is not None:
            tail = await self._tail(handle, self._options.log_tail_lines)
            try:
                code = await self._dispose(handle, self._spec.stop_timeout)
            except Exception as exc:
                self._residue, self._residue_running = handle, True
                reason += f"; stopping it failed too ({exc}): removed as soon as the runtime answers"
            else:
                self._forget_exit()
        self._handle = None
        self._fail(reason, code, tail, unavailable=unavailable)

    async def _after_exit(self, watch: "asyncio.Future[Exit]", handle: EngineHandle | None, when: str) -> None:
        reason, code = self._exit_reason(watch, when)
        tail = await self._tail(handle, self._options.log_tail_lines) if handle is not None else ()
        self._handle = None
        if handle is not None:
            self._residue, self._residue_running = handle, code is None
        self._fail(reason, code, tail, unavailable=code is None)
        if handle is not None:
            self._run(Op.REAP, self._reap(handle, with_tail=False))

    # -- the engine's end --------------------------------------------------------------------------------

    def _watch(self, handle: EngineHandle) -> None:
        self._handle = handle
        watch = asyncio.ensure_future(handle.wait_exit())
        self._exit = watch
        watch.add_done_callback(lambda _: self._check_exit())

    def _forget_exit(self) -> None:
        self._asleep = False
        watch, self._exit = self._exit, None
        if watch is not None and not watch.done():
            watch.cancel()

    def _check_exit(self) -> None:
        """An engine that ended while READY or SLEEPING with no operation running has crashed (an operation in
        progress watches the exit itself, and this runs again when it ends: an engine that exits right after a
        wake is never left READY with nobody watching)."""
        watch, handle = self._exit, self._handle
        if watch is None or not watch.done() or watch.cancelled() or handle is None or self._running() is not None:
            return
        if self._closed and self._runtime.detached:
            return  # left to the next gateway
        if self._state not in (S.READY, S.SLEEPING):
            return
        reason, code = self._exit_reason(watch, "{name} exited unexpectedly with {exit}")
        self._handle, self._ready_since = None, None
        self._residue, self._residue_running = handle, code is None  # lost track of it: it may still run
        self._fail(reason, code, (), unavailable=code is None)
        # Its last lines, then reap what it left behind (process group, container) before a retry can start.
        self._run(Op.REAP, self._reap(handle, with_tail=True))

    def _exit_reason(self, watch: "asyncio.Future[Exit]", when: str) -> tuple[str, int | None]:
        try:
            end = watch.result()
        except RuntimeUnavailable as exc:
            return f"{self.name}: lost track of its engine: {exc}", None
        except Exception as exc:
            return f"{self.name}: lost track of its engine: {exc!r}", None
        return when.format(name=self.name, exit=end.describe()), end.code

    async def _race(self, work: Awaitable[T], handle: EngineHandle) -> T:
        """`work`, unless the engine exits first (EngineExited)."""
        task = asyncio.ensure_future(work)
        watch = self._exit
        try:
            if watch is None:
                return await task
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise EngineExited(watch)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # -- helpers -----------------------------------------------------------------------------------------

    def _launch_spec(self) -> ModelSpec:
        launch = self._engine.launch_spec(self._spec)
        return launch.model_copy(update={"placed_on": self._placed}) if self._placed else launch

    def _grace_for_residue(self) -> float:
        # An engine that exited leaves remains only (a process group, a stopped container): no grace needed.
        return self._spec.stop_timeout if self._residue_running else 0.0

    async def _dispose(self, handle: EngineHandle, grace: float) -> int | None:
        """Stop `handle`, retrying while the runtime is unreachable for up to `stop_retry` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.stop_retry
        pause = 0.5
        while True:
            try:
                return await handle.stop(grace)
            except RuntimeUnavailable:
                if loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _tail(self, handle: EngineHandle, lines: int) -> tuple[str, ...]:
        try:
            return await asyncio.wait_for(handle.log_tail(lines), timeout=5)
        except Exception as exc:  # logs are a courtesy; their absence must not hide the failure
            return (f"(engine output unavailable: {exc or type(exc).__name__})",)

    def _fail(self, reason: str, exit_code: int | None, log_tail: tuple[str, ...], unavailable: bool = False) -> None:
        now = self._clock.now()
        stable = self._ready_since is not None and now - self._ready_since >= self._options.stable_after
        self._failures = 1 if stable else self._failures + 1
        # A runtime that is down (not the engine's fault) is retried soon: it recovers on its own.
        cap = min(self._options.backoff_cap, 5.0) if unavailable else self._options.backoff_cap
        self._retry_at = now + retry_delay(self._failures, cap)
        self._last_error = Failure(reason, exit_code, log_tail, self._clock.wall())
        self._ready_since = None
        self._transition(S.FAILED, reason, exit_code=exit_code, failures=self._failures,
                         retry_in=round(self._retry_at - now, 3), log_tail=list(log_tail[-10:]))

    def _transition(self, target: ModelState, reason: str, **data: object) -> None:
        check_transition(self.name, self._state, target)
        source, self._state, self._since = self._state, target, self._clock.now()
        self._events.emit(Event(self._clock.wall(), self.name, "transition", source, target, reason, dict(data)))
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._on_change is not None:
            self._on_change()


async def _settled(task: "asyncio.Future[object]") -> None:
    """Wait for `task` to end, whatever its outcome (the state tells it). A cancellation of the caller goes on,
    even when `task` ends in the same loop turn (it used to be swallowed then: a start taken over while it waited
    for the stop before it went on and launched its engine; tests/sim/test_regressions.py)."""
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not task.done() or (current is not None and current.cancelling()):
            raise
    except Exception:
        pass


async def _result_of(task: "asyncio.Future[T]") -> T | None:
    """The result of `task` once it ends, waiting through any cancellation of ours; None if it failed."""
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


async def _finish(work: Awaitable[None]) -> None:
    """Run clean-up `work` to its end even if the task running it is cancelled meanwhile; the cancellation goes
    on afterwards (a second stop, or a stop then a shutdown, must not leave a model STARTING with its engine alive)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


__all__ = ["ModelController", "Op"]
