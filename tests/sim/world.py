"""A fake of everything outside the waker, with faults on demand: engines, the runtime that runs them (Docker-like,
on several nodes) and the engines' own HTTP API.

Built for the simulation (tests/sim): the real waker drives it, a checker reads it. Everything that takes time
takes virtual time (`asyncio.sleep`, `loop.call_later`; see tests/sim/vtime.py), and nothing uses threads or
sockets, so a run is deterministic.

What the world holds, as a checker sees it:
- `SimRuntime.engines`: every engine ever made, in order; `SimRuntime.running()`: those that hold memory.
- `SimEngine.state`: CREATING (the runtime is making it), LOADING, READY, ASLEEP, EXITED; `removed` once its
  container is gone (a stopped engine of a `keep_container` spec stays, not running, until the next start).

Faults:
- per start, a `Behaviour` (`SimRuntime.default`, or scripted for a model's next starts with `script`): how long
  creation and loading take (or loading never ends: the engine hangs at start), a launch error, an exit at start,
  an engine that ignores SIGTERM, slow or failing sleep and wake calls, an exit while waking. The engine keeps its
  own copy, which a test may change while it runs (`engine.behaviour.fail_wake = True`).
- any time: `SimEngine.crash(code)`; `SimRuntime.down(*nodes)` / `up(*nodes)`, an outage of the runtime on some
  nodes (Docker daemons unreachable): start, stop, log_tail and discard raise RuntimeUnavailable, and an engine
  that exits meanwhile is only reported once its nodes are back (as Docker: nobody learns of it before).

Like Docker's, the runtime is detached (engines outlive a gateway) and an Adopter (discover, discard, claim).
Unlike Docker's, a start never reuses an engine it finds running or kept: it always makes a new one, so an
engine the waker lost track of stays visible to the checker instead of being quietly taken over.
"""

import asyncio
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from waker.config.spec import IdleAction, ModelSpec
from waker.engines.base import Call, Engine, Readiness
from waker.lifecycle.engine_api import EngineCallError
from waker.runtime.base import Exit, Found, RuntimeUnavailable

SIGKILLED = 137  # the exit code Docker reports for an engine killed after its grace (128 + SIGKILL)


class EngineState(StrEnum):
    CREATING = "creating"  # the runtime is making it: not started yet, holds nothing
    LOADING = "loading"  # started, loading its model: holds memory, not answering yet
    READY = "ready"
    ASLEEP = "asleep"  # answering, its weights offloaded (sleep mode)
    EXITED = "exited"


@dataclasses.dataclass(slots=True)
class Behaviour:
    """How one engine instance behaves: the faults one start gets. Times are virtual seconds."""

    creation_time: float = 0.5  # the runtime makes the engine (container create + start) before it exists
    launch_error: Exception | None = None  # start raises this at once (a missing image, a refused launch)
    load_time: float | None = 5.0  # LOADING to READY; None: it never gets ready (hangs at start)
    exit_after: float | None = None  # exits this long after it started (at start when before load_time)
    exit_code: int = 1  # ... with this code
    ignores_sigterm: bool = False  # a stop takes the whole grace, then it is killed (code 137)
    shutdown_time: float = 0.0  # honouring SIGTERM, it exits this long after (killed when longer than the grace)
    sleep_time: float = 0.5  # each sleep call takes this long
    wake_time: float = 1.0  # each wake call takes this long
    fail_sleep: bool = False  # sleep calls answer 500, it stays awake
    fail_wake: bool = False  # wake calls answer 500, it stays asleep
    exit_on_wake: int | None = None  # it exits with this code halfway through a wake call
    garbled: bool = False  # it can't generate (a wake that answered 200 and broke it: vLLM #49237, #50011)


class SimEngine:
    """One engine instance (an EngineHandle): what it runs, where, and in which state."""

    def __init__(self, runtime: "SimRuntime", number: int, spec: ModelSpec, adapter: Engine,
                 nodes: tuple[str, ...], behaviour: Behaviour) -> None:
        self._runtime = runtime
        self.number = number
        self.spec = spec  # as launched (the hash discover reports is its spec_hash())
        self.adapter = adapter
        self.nodes = nodes
        self.behaviour = dataclasses.replace(behaviour)  # its own copy: a test may change it while it runs
        self.keep = spec.keep_container  # a stop keeps it (stopped) instead of removing it
        # The memory it takes (GB on each of its nodes): its entry's declaration when it was launched, or when a
        # new gateway claimed it (the world can't know better than the entry, and nothing else sizes it).
        self.memory_gb, self.sleeping_gb = spec.memory_gb, spec.sleeping_gb
        self.state = EngineState.CREATING
        self.removed = False
        self.exit: Exit | None = None  # how it ended, reported or not (wait_exit: only once reported)
        self.lines: list[str] = [f"engine {number} of {spec.name} on {', '.join(nodes)}: creating"]
        self.stops = 0  # stop() calls, for tests
        loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[Exit] = loop.create_future()
        self._reported: asyncio.Future[Exit] = loop.create_future()
        self._answering = asyncio.Event()  # set once it answers HTTP (ready, then maybe asleep)
        # Dicts, not sets: iteration order must not depend on ids, or two runs could wake tasks in other orders.
        self._timers: dict[asyncio.TimerHandle, None] = {}
        self._kill: asyncio.TimerHandle | None = None
        self._remove_at_exit = False
        self._calls: dict[asyncio.Future[None], None] = {}  # sleep/wake calls in progress, failed if it exits

    def __repr__(self) -> str:
        return f"<SimEngine {self.number} {self.spec.name} {self.state}{' removed' if self.removed else ''}>"

    # EngineHandle

    @property
    def ident(self) -> str:
        return f"sim-{self.number}"

    @property
    def root_url(self) -> str:
        return f"http://sim-{self.number}"

    @property
    def api_base(self) -> str:
        return self.root_url + "/v1"

    @property
    def exit_code(self) -> int | None:
        return self._reported.result().code if self._reported.done() else None

    async def wait_exit(self) -> Exit:
        return await asyncio.shield(self._reported)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM, SIGKILL after `grace`; removed unless kept. Cancel-safe: once asked, the engine ends (and is
        removed) on its own schedule even if the caller stops waiting, as a Docker stop runs on in its thread."""
        self.stops += 1
        self._runtime.check_reachable(self.nodes)
        if self.state is EngineState.EXITED:
            self.removed = self.removed or not self.keep
        else:
            self._terminate(grace, remove=not self.keep)
        exit = await asyncio.shield(self._ended)
        self._runtime.check_reachable(self.nodes)  # the runtime went away meanwhile: its answer is lost
        return exit.code

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        self._runtime.check_reachable(self.nodes)
        return tuple(self.lines[-lines:]) if lines > 0 else ()

    # Faults and facts for tests

    def crash(self, code: int = 1, oom: bool = False) -> None:
        """It exits now, on its own (reported once its nodes' runtime is reachable)."""
        self._end(Exit(code, oom), "crashed")

    def say(self, line: str) -> None:
        self.lines.append(line)

    @property
    def holds_memory(self) -> bool:
        return self.state in (EngineState.LOADING, EngineState.READY, EngineState.ASLEEP)

    @property
    def held_gb(self) -> float:
        """What it really holds on each of its nodes now: its sleeping footprint asleep, nothing once exited."""
        if self.state is EngineState.ASLEEP:
            return self.sleeping_gb
        return self.memory_gb if self.holds_memory else 0.0

    # Life, driven by timers (virtual time)

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        def fire() -> None:
            self._timers.pop(timer, None)
            action()

        timer = asyncio.get_running_loop().call_later(delay, fire)
        self._timers[timer] = None

    def _boot(self) -> None:
        self.state = EngineState.LOADING
        self.say("loading")
        if self.behaviour.load_time is not None:
            self._later(self.behaviour.load_time, self._ready)
        if self.behaviour.exit_after is not None:
            self._later(self.behaviour.exit_after, lambda: self._end(Exit(self.behaviour.exit_code), "failed"))

    def _ready(self) -> None:
        if self.state is EngineState.LOADING:
            self.state = EngineState.READY
            self._answering.set()
            self.say("ready")

    def _abandon(self, why: str) -> None:
        """A creation that never finished: it never ran, and nothing of it is left."""
        self.say(f"creation abandoned: {why}")
        self._remove_at_exit = True
        self._end(Exit(SIGKILLED), "never started")

    def _terminate(self, grace: float, remove: bool) -> None:
        self._remove_at_exit = self._remove_at_exit or remove
        loop = asyncio.get_running_loop()
        kill_at = loop.time() + max(0.0, grace)
        if self._kill is not None:  # stopped before: a shorter grace now brings the kill forward
            if self._kill.when() <= kill_at:
                return
            self._kill.cancel()
        self.say("SIGTERM")
        self._kill = loop.call_at(kill_at, lambda: self._end(Exit(SIGKILLED), "killed after its grace"))
        self._timers[self._kill] = None
        if not self.behaviour.ignores_sigterm and self.behaviour.shutdown_time < grace:
            self._later(self.behaviour.shutdown_time, lambda: self._end(Exit(0), "stopped"))

    def _end(self, exit: Exit, how: str) -> None:
        if self.state is EngineState.EXITED:
            return
        self.state = EngineState.EXITED
        self.exit = exit
        self.removed = self.removed or self._remove_at_exit
        self.say(f"{how}: exit {exit.describe()}")
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for call in self._calls:
            if not call.done():
                call.set_exception(EngineCallError(f"{self.root_url}: connection reset (the engine exited)"))
        self._calls.clear()
        self._ended.set_result(exit)
        self._runtime._exited(self)

    def _report(self) -> None:
        assert self.exit is not None
        if not self._reported.done():
            self._reported.set_result(self.exit)

    # The engine's HTTP API (served through SimEngineApi)

    @property
    def answers(self) -> bool:
        """It answers HTTP: ready or asleep."""
        return self.state in (EngineState.READY, EngineState.ASLEEP)

    def _role(self, call: Call) -> str | None:
        """"sleep", "wake" (a step), "woken" (the last wake step), or None: a route it doesn't have (404)."""
        if self.spec.idle_action is not IdleAction.SLEEP:
            # Its sleep routes exist only when it was launched in sleep mode, which the adapter's launch_spec sets
            # for idle_action sleep alone (vLLM: --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1).
            return None
        try:
            sleep = self.adapter.sleep_calls(self.spec)
            wake = self.adapter.wake_calls(self.spec)
        except ValueError:  # no sleep mode: no such routes
            return None
        if call in sleep:
            return "sleep"
        if call in wake:
            return "woken" if call == wake[-1] else "wake"
        return None

    async def _serve(self, call: Call) -> None:
        what = f"{call.method} {call.path}"
        if not self.answers:
            raise EngineCallError(f"{what} failed: cannot connect to {self.root_url}")
        if call.path == "/v1/completions":  # a generation (the check after a wake): at once, when it can
            if self.state is not EngineState.READY or self.behaviour.garbled:
                raise EngineCallError(f"{what} answered 500: CUDA error: an illegal memory access was encountered")
            return
        role = self._role(call)
        if role is None:
            raise EngineCallError(f"{what} answered 404: Not Found")
        b = self.behaviour
        if b.fail_sleep if role == "sleep" else b.fail_wake:
            raise EngineCallError(f"{what} answered 500: Internal Server Error")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved here: when the caller stopped waiting (timed out, cancelled), nobody else would, and asyncio
        # would report the exit's error as "never retrieved".
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._calls[done] = None

        def finish() -> None:
            if done.done():
                return
            if role == "sleep":
                if self.state is EngineState.READY:
                    self.state = EngineState.ASLEEP
                    self.say("asleep")
            elif role == "woken" and self.state is EngineState.ASLEEP:
                self.state = EngineState.READY
                self.say("awake")
            done.set_result(None)
            self._calls.pop(done, None)

        # The engine does the work whether or not the caller waits for it (a timed-out or cancelled request
        # still lands), so it runs on the engine's timers and the caller only watches.
        if role == "sleep":
            self._later(b.sleep_time, finish)
        else:
            if b.exit_on_wake is not None:
                code = b.exit_on_wake
                self._later(b.wake_time / 2, lambda: self._end(Exit(code), "failed while waking"))
            self._later(b.wake_time, finish)
        await asyncio.shield(done)


class SimRuntime:
    """A Docker-like runtime over named nodes (Runtime and Adopter). Keeps every engine it ever made."""

    detached = True

    def __init__(self, nodes: Sequence[str] = ("a", "b"), default: Behaviour | None = None) -> None:
        self.nodes = tuple(nodes)
        self.default = default if default is not None else Behaviour()
        self.engines: list[SimEngine] = []
        self.unreachable: set[str] = set()
        self.starts = 0  # start() calls, for tests
        self._scripts: dict[str, list[Behaviour]] = {}
        self._numbers = itertools.count(1)
        self._unreported: list[SimEngine] = []

    # Faults

    def script(self, model: str, *behaviours: Behaviour) -> None:
        """The next starts of `model` behave so, one each, in order; later ones as `default`."""
        self._scripts.setdefault(model, []).extend(behaviours)

    def unscript(self) -> None:
        """Forget every scripted behaviour not used yet: later starts behave as `default`."""
        self._scripts.clear()

    def down(self, *nodes: str) -> None:
        """The runtime on `nodes` (all when none given) can't be reached until `up`."""
        self.unreachable.update(self._known(nodes or self.nodes))

    def up(self, *nodes: str) -> None:
        """Reachable again; exits that happened meanwhile are reported now."""
        self.unreachable.difference_update(self._known(nodes or self.nodes))
        hidden, self._unreported = self._unreported, []
        for engine in hidden:
            self._exited(engine)

    # Facts for a checker

    def running(self) -> list[SimEngine]:
        """The engines that exist and have not exited: those holding memory."""
        return [e for e in self.engines if e.holds_memory]

    def engine(self, root_url: str) -> SimEngine | None:
        return next((e for e in self.engines if e.root_url == root_url), None)

    def reachable(self, nodes: Sequence[str]) -> bool:
        return not self.unreachable.intersection(nodes)

    def check_reachable(self, nodes: Sequence[str]) -> None:
        if not self.reachable(nodes):
            down = ", ".join(sorted(self.unreachable.intersection(nodes)))
            raise RuntimeUnavailable(f"the runtime on {down} is unreachable")

    # Runtime

    async def start(self, spec: ModelSpec, engine: Engine) -> SimEngine:
        """Make the engine (behaviour.creation_time), then start it. Cancel-safe: a start cancelled while the
        engine is being made leaves nothing behind."""
        self.starts += 1
        queue = self._scripts.get(spec.name)
        behaviour = queue.pop(0) if queue else self.default
        nodes = self._nodes_for(spec)
        self.check_reachable(nodes)
        if behaviour.launch_error is not None:
            raise behaviour.launch_error
        # Like Docker's: what is left of the model's earlier engines (stopped, kept, crashed) goes first; on the node
        # it starts on, a running engine of the model launched from the same spec is used as it is (DockerRuntime
        # reuses such a container: a gateway that lost track of it finds it again), any other one is removed.
        for old in self.engines:
            if old.spec.name != spec.name or old.removed:
                continue
            if old.state is EngineState.EXITED:
                old.removed = True
            elif old.nodes == nodes and old.state in (EngineState.LOADING, EngineState.READY) \
                    and old.spec.spec_hash() == spec.spec_hash():
                old.say("used again by a new start")
                return old
            elif old.nodes == nodes and old.state is not EngineState.CREATING:
                old._terminate(0.0, remove=True)
        made = SimEngine(self, next(self._numbers), spec, engine, nodes, behaviour)
        self.engines.append(made)
        try:
            await asyncio.sleep(behaviour.creation_time)
        except asyncio.CancelledError:
            made._abandon("start cancelled")
            raise
        if not self.reachable(nodes):
            made._abandon("the runtime went away")
            self.check_reachable(nodes)
        made._boot()
        return made

    # Adopter

    async def discover(self) -> list[Found]:
        """Every engine not removed, on reachable nodes (as Docker's: unreachable nodes are skipped)."""
        return [Found(e.spec.name, e.spec.spec_hash(), e.state is not EngineState.EXITED, e, e.nodes)
                for e in self.engines
                if not e.removed and e.state is not EngineState.CREATING and self.reachable(e.nodes)]

    async def discard(self, found: Found, reason: str) -> None:
        engine = self._mine(found)
        self.check_reachable(engine.nodes)
        engine.say(f"discarded: {reason}")
        if engine.state is EngineState.EXITED:
            engine.removed = True
            return
        engine._terminate(10.0, remove=True)
        await asyncio.shield(engine._ended)

    def claim(self, found: Found, spec: ModelSpec) -> SimEngine:
        engine = self._mine(found)
        engine.keep = spec.keep_container
        engine.memory_gb, engine.sleeping_gb = spec.memory_gb, spec.sleeping_gb
        return engine

    # Inner workings

    def _exited(self, engine: SimEngine) -> None:
        if self.reachable(engine.nodes):
            engine._report()
        else:
            self._unreported.append(engine)

    def _nodes_for(self, spec: ModelSpec) -> tuple[str, ...]:
        nodes = spec.placed_on or ((spec.home,) if spec.home else self.nodes[:1])
        return self._known(nodes)

    def _known(self, nodes: Sequence[str]) -> tuple[str, ...]:
        for node in nodes:
            if node not in self.nodes:
                raise ValueError(f"unknown node {node!r} (configured: {', '.join(self.nodes)})")
        return tuple(nodes)

    def _mine(self, found: Found) -> SimEngine:
        if not isinstance(found.handle, SimEngine) or found.handle not in self.engines:
            raise ValueError(f"{found.handle!r} is not an engine of this runtime")
        return found.handle


class SimEngineApi:
    """The engines' HTTP API (waker.lifecycle.engine_api.EngineApi) served by a SimRuntime's engines."""

    def __init__(self, runtime: SimRuntime) -> None:
        self._runtime = runtime
        self.calls: list[tuple[str, Call]] = []  # every call made, (root_url, call), for tests

    async def until_ready(self, root_url: str, check: Readiness, served_name: str) -> None:
        """Returns once the engine answers; never when it doesn't (hangs, exited, unknown, wrong served name), as
        polling a dead port never succeeds."""
        engine = self._runtime.engine(root_url)
        if engine is not None and not (check.expect_model and served_name != engine.spec.upstream_name):
            await engine._answering.wait()
            if engine.answers:
                return
        await _forever()

    async def call(self, root_url: str, calls: Sequence[Call], timeout: float) -> None:
        engine = self._runtime.engine(root_url)
        for call in calls:
            self.calls.append((root_url, call))
            if engine is None:
                raise EngineCallError(f"{call.method} {call.path} failed: cannot connect to {root_url}")
            try:
                async with asyncio.timeout(timeout):
                    await engine._serve(call)
            except TimeoutError as exc:
                raise EngineCallError(f"{call.method} {call.path} failed: no answer in {timeout} s") from exc

    async def is_sleeping(self, root_url: str, call: Call) -> bool | None:
        engine = self._runtime.engine(root_url)
        if engine is None or not engine.answers:
            return None
        return engine.state is EngineState.ASLEEP


async def _forever() -> Any:
    await asyncio.get_running_loop().create_future()


__all__ = ["SIGKILLED", "Behaviour", "EngineState", "SimEngine", "SimEngineApi", "SimRuntime"]
