"""Virtual time for simulations: asyncio code runs on an event loop whose clock jumps to the next timer.

Built on `looptime` (https://github.com/nolar/looptime): its loop advances `loop.time()` instantly, straight
to the next scheduled timer, whenever nothing is runnable. `asyncio.sleep(3600)`, `asyncio.timeout` and
`wait_for` then cost no real time, and a run is a pure function of its program: two runs of the same program
give the same events in the same order.

That holds only while nothing outside the loop can wake it, so simulated code must use no threads and no
real I/O. looptime waits in *real* time for executor futures (it can't know when a thread will finish), so
`VirtualTime` gives its loop an executor that refuses work: a `run_in_executor`, or a DNS lookup through
`loop.getaddrinfo`, fails loudly instead of making the run slow and nondeterministic.

What "nothing is runnable" means here: the loop's ready queue is empty. Then, with no I/O and no threads,
nothing can happen before the next timer, so the clock may jump at once. looptime's default of 42 "no-op
cycles" before each jump (a grace for I/O that may still arrive) is pointless without I/O and costs ~10x
per jump, so the loop is made with `noop_cycles=0`.

Two ways a run can fail to end, both reported at once in real time, naming where each task waits:
- `Stuck`: the coroutine did not end within `run`'s `limit` of virtual time. Needed because a waker always has
  some timer set (a periodic loop), so time would jump on for ever; with a limit set, a deadlock shows up this
  way too (the limit is itself a timer).
- `Deadlock` (only with `limit=None`): nothing runnable and no timer set, so nothing can ever happen again.
  looptime (made with `idle_timeout=0`) then fails every waiting task with its `IdleTimeoutError`.

Instants: `advance(s)` lets exactly `s` seconds pass, and `settle()` lets everything runnable at the current
instant run without time moving (a task woken by a timer runs one loop turn after the timer fired, so the
sleep that ends `advance` alone would return before it). `run` settles after its coroutine by default, so a
checker called between runs sees the world at rest.
"""

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import looptime

T = TypeVar("T")

EPOCH = 1_700_000_000.0  # wall() = EPOCH + loop.time(), as waker.clock.FakeClock
START = 1000.0  # loop.time() at the start of a run: away from 0, which code may read as "never"


class Deadlock(RuntimeError):
    """Every task waits and no timer is set: nothing can ever happen again."""


class Stuck(RuntimeError):
    """A run did not end within its limit of virtual time (while timers kept time moving)."""


class Livelock(RuntimeError):
    """Tasks keep rescheduling each other at one instant and never let time pass."""


class LoopClock:
    """The waker's `Clock` (waker.clock) read from an event loop's time, so it follows virtual time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, epoch: float = EPOCH) -> None:
        self._loop = loop
        self._epoch = epoch

    def now(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return self._epoch + self._loop.time()


class _NoThreads(ThreadPoolExecutor):
    """The default executor of a virtual-time loop: threads would make time real and runs nondeterministic."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        raise RuntimeError(f"no threads in virtual time (asked to run {getattr(fn, '__qualname__', fn)!r})")


async def settle(max_rounds: int = 100_000) -> None:
    """Let every task that can run at this instant run, until nothing is runnable without time passing.

    Time never moves meanwhile: this task is itself always runnable, so the loop never jumps to a timer.
    Reads the loop's ready queue and timer heap (private to asyncio's BaseEventLoop, stable since 3.4): no
    public API says "nothing else is runnable", and counting `sleep(0)`s would only guess.
    """
    loop = asyncio.get_running_loop()
    for _ in range(max_rounds):
        ready, timers = _runnable(loop)
        due = bool(timers) and timers[0].when() <= loop.time()
        if not ready and not due:
            return
        await asyncio.sleep(0)
    ready, timers = _runnable(loop)
    due = [timer for timer in timers if timer.when() <= loop.time()]
    handles = "\n".join(f"  {handle!r}" for handle in [*list(ready)[:10], *due[:10]])
    raise Livelock(f"still busy after {max_rounds} rounds at t={loop.time()}; runnable:\n{handles}\nthe tasks:\n"
                   + _describe_tasks(loop))


def _runnable(loop: asyncio.AbstractEventLoop) -> tuple[Any, list[asyncio.TimerHandle]]:
    """The loop's ready queue and timer heap, read afresh each time: the loop replaces its heap with a new list when
    it purges cancelled timers (more than 100 timers, half of them cancelled), so a list read once goes stale and a
    timer due in the new one looks due for ever (a Livelock that wasn't)."""
    return getattr(loop, "_ready"), getattr(loop, "_scheduled")  # noqa: B009 - private on purpose, see settle


async def advance(seconds: float) -> None:
    """Let exactly `seconds` of virtual time pass: every timer due meanwhile fires, in order, and what they
    wake runs; then everything runnable at the new instant runs too (`settle`)."""
    if seconds < 0:
        raise ValueError(f"time can't go back ({seconds} s)")
    await asyncio.sleep(seconds)
    await settle()


_settle = settle  # VirtualTime.run's `settle` flag shadows the name


class VirtualTime:
    """One simulation run's event loop, in virtual time.

    Drive it from synchronous code (a hypothesis state machine's rules): `vt.run(coro)` runs `coro` to its
    end on the loop, lets everything due at that instant run too (`settle`), and returns its result. Tasks
    the coroutine started live on between runs; time stands still between runs (the loop isn't running).
    `close()` cancels what is left, lets it clean up (in virtual time too) and closes the loop.
    """

    def __init__(self, start: float = START, epoch: float = EPOCH) -> None:
        loop = looptime.patch_event_loop(asyncio.SelectorEventLoop(), start=start, noop_cycles=0, idle_timeout=0.0)
        loop.set_default_executor(_NoThreads(max_workers=1))
        loop.set_exception_handler(self._unhandled)
        self.loop: asyncio.AbstractEventLoop = loop
        self.clock = LoopClock(loop, epoch)
        # What the loop's exception handler saw (e.g. "Task exception was never retrieved"): a simulation
        # asserts it stays empty, since such errors are otherwise only logged.
        self.unhandled: list[dict[str, Any]] = []

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.unhandled.append(context)
        loop.default_exception_handler(context)

    def now(self) -> float:
        return self.loop.time()

    def run(self, coro: Coroutine[Any, Any, T], *, settle: bool = True, limit: float | None = 86_400.0) -> T:
        """Run `coro` to its end in virtual time; with `settle`, also everything runnable at the instant it ends.

        `limit`: virtual seconds `coro` may take; past it, it is cancelled and `Stuck` raised. Without a limit, a
        coroutine that never ends while some task keeps a timer set (a periodic loop) would spin for ever.
        """

        async def main() -> T:
            work = asyncio.ensure_future(coro)
            try:
                await asyncio.wait({work}, timeout=limit)
            except looptime.IdleTimeoutError:
                # looptime failed every waiting task with this error; described before they unwind.
                failure: Exception = Deadlock(f"at t={self.now()}: every task waits and no timer is set; "
                                              "waiting were:\n" + _describe_tasks(self.loop))
            else:
                if work.done():
                    result = work.result()
                    if settle:
                        await _settle()
                    return result
                failure = Stuck(f"still running after {limit} virtual seconds (t={self.now()}); the tasks:\n"
                                + _describe_tasks(self.loop))
            work.cancel()
            await asyncio.wait({work})
            if not work.cancelled():
                # Retrieved, so it is not reported as "never retrieved" when collected: that report runs Python
                # code from the garbage collector, and Python 3.11 fails an unlucky compile() under way then
                # ("AST constructor recursion depth mismatch", seen in pytest's assertion rewriting).
                work.exception()
            raise failure

        return self.loop.run_until_complete(main())

    def close(self) -> None:
        """Cancel every task left, let them finish their clean-up, close the loop."""
        loop = self.loop
        if loop.is_closed():
            return
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                # Clean-up may itself wait for timers (a stop's grace): virtual time passes for it.
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def __enter__(self) -> "VirtualTime":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _describe_tasks(loop: asyncio.AbstractEventLoop) -> str:
    """Each task of `loop` but the current one, with where it waits (the innermost awaits of its coroutine)."""
    current = asyncio.current_task(loop)
    lines = []
    for task in sorted(asyncio.all_tasks(loop) - {current}, key=lambda t: t.get_name()):
        lines.append(f"  {task.get_name()}: {' > '.join(_awaits(task.get_coro())[-3:]) or '?'}")
    return "\n".join(lines) or "  (no other tasks)"


def _awaits(coro: Any) -> list[str]:
    """`file:line in function` for each coroutine down the chain `coro` awaits (Task.get_stack stops at the first)."""
    chain = []
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frame = coro.cr_frame
        chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None)
    return chain
