"""The simulation: a hypothesis state machine drives the real waker over the fake world, in virtual time.

The waker is the production one (controllers, gates, cluster and node admission, placement, reloads, the idle
reaper, adoption at boot); only the world around it is fake (tests/sim/world.py: engines, a Docker-like
runtime on nodes "a" and "b", the engines' HTTP API), and time is virtual (tests/sim/vtime.py): a step that
lets two minutes pass costs milliseconds, and a run is a pure function of the steps hypothesis chose, so a
failure shrinks and replays.

Rules (each a step hypothesis may take, in any order): requests (streamed or not, held for a while, the client
maybe leaving); admin stop, sleep, warm and pin; reloads (add, remove, change memory_gb, change args); faults
(the next start of a model exits, hangs, is slow to create, can't launch, ignores SIGTERM, crashes later,
exits or fails while waking, fails to sleep; a running engine crashes or turns bad; a sleeping engine woken
as it misbehaves; an admin stop while the runtime is still creating the engine; the runtime unreachable on some
nodes for a short or a long while); a gateway restart (a new waker adopts what runs, maybe with a lower budget
or a changed models.d); time passing; and the recovery check (faults end, every model serves).

Invariants, checked after every step (`@invariant`):
1. Each node's ledger is within its capacity, equals what the models say they hold there, and is never less
   than what the world's engines really hold there (no engine holds memory the ledger doesn't count).
2. No model is STARTING, WAKING or STOPPING without a live operation task, nor longer than its bound.
3. No orphans, no ghosts: every engine the runtime runs is a model's engine; every READY or SLEEPING model's
   engine is alive (and awake when READY, asleep when SLEEPING), unless an outage hides its exit.
4. Every request ends within its bound: answered, refused with an error the gateway maps to an OpenAI error,
   or left by its client; nothing fails out of sight (operation tasks, the waker's loops, ERROR logs,
   "internal_error" events, exceptions nobody retrieved).
5. When faults end and time passes, every model is stable, models.d is applied (removed models forgotten, each
   engine launched from its model's entry as it is now), and a new request for each model is answered (a rule,
   and the teardown of every run that passed).

Known defects the checks tolerate until they are fixed are marked TODO, each naming the xfail scenario in
test_regressions.py that shows it; a fix makes that scenario pass (strict xfail fails), and the TODO goes.
"""

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import sys
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import currently_in_test_context, event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.sim.vtime import VirtualTime, advance
from tests.sim.world import Behaviour, EngineState, SimEngine, SimEngineApi, SimRuntime
from waker.config.registry import ConfigError, Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.registry import engine_for
from waker.errors import ModelNotFound, NoRoom, QueueFull, ShuttingDown, StartFailed, WakerError
from waker.events import Event, EventLog
from waker.gate import Endpoint, Gate
from waker.lifecycle.controller import Op
from waker.options import WakerOptions
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.state import TRANSITIONAL, ModelState
from waker.waker import Waker

S = ModelState
T = TypeVar("T")

# -- the world's shape --------------------------------------------------------------------------------------

NODES: dict[str, float] = {"a": 100.0, "b": 50.0}  # each node's budget in GB (no reserve)
TIMEOUTS: dict[str, Any] = {"start_timeout": 30.0, "wake_timeout": 10.0, "stop_timeout": 5.0,
                            "idle_timeout": 20.0, "min_uptime": 5.0}
OPTIONS = WakerOptions(reap_interval=1.0, stop_retry=10.0, backoff_cap=20.0, stable_after=60.0,
                       rediscover_interval=10.0)
QUEUE = QueuePolicy(max_queue=6, max_wait=60.0, max_hold=10.0, poll_interval=0.5)
NORMAL = Behaviour(creation_time=0.5, load_time=5.0, sleep_time=0.5, wake_time=1.0)
KEEPALIVE = 1.0  # a streaming client waiting for a cold model is sent a comment this often (gateway/proxy.py)


def docker_model(name: str, memory_gb: float, **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": name, "engine": "generic", "runtime": "docker", "image": "sim",
                        "memory_gb": memory_gb, **TIMEOUTS, **fields})


def vllm_model(name: str, memory_gb: float, **fields: Any) -> ModelSpec:
    return docker_model(name, memory_gb, engine="vllm", model="weights", **fields)


# Sizes chosen so that some fit together and some evict each other: big fits only on a, and with little else.
CATALOGUE: dict[str, ModelSpec] = {spec.name: spec for spec in (
    docker_model("big", 70),
    docker_model("mid", 40),
    docker_model("small", 20, node="b", keep_container=True),  # bound to b; a stop keeps its container
    docker_model("tiny", 10, max_concurrent=1, max_waiting=2),
    vllm_model("sleepy", 30, idle_action="sleep", sleep_memory_gb=4),  # sleeps when idle; adopted asleep
    vllm_model("wide", 20, nodes=2),  # spans both nodes: admitted by a, then b
)}
FIRST = tuple(CATALOGUE)  # models.d at the start

# The faults one start of a model can get (SimRuntime.script).
START_FAULTS: dict[str, Behaviour] = {
    "exits_at_start": dataclasses.replace(NORMAL, exit_after=2.0, exit_code=1),
    "hangs_at_start": dataclasses.replace(NORMAL, load_time=None),
    "slow_creation": dataclasses.replace(NORMAL, creation_time=20.0),
    "launch_error": dataclasses.replace(NORMAL, launch_error=RuntimeError("image 'sim' not found")),
    "ignores_sigterm": dataclasses.replace(NORMAL, ignores_sigterm=True),
    "slow_shutdown": dataclasses.replace(NORMAL, shutdown_time=3.0),
    "crashes_when_ready": dataclasses.replace(NORMAL, exit_after=12.0, exit_code=139),
    "exits_while_waking": dataclasses.replace(NORMAL, exit_on_wake=1),
    "fails_to_wake": dataclasses.replace(NORMAL, fail_wake=True),
    "garbled_by_wake": dataclasses.replace(NORMAL, garbled=True),
    "slow_to_wake": dataclasses.replace(NORMAL, wake_time=4.0),  # three calls: past wake_timeout
    "fails_to_sleep": dataclasses.replace(NORMAL, fail_sleep=True),
}
ENGINE_FAULTS = ("crash", "exit_on_wake", "fail_wake", "garbled_wake", "fail_sleep", "ignore_sigterm")

# -- bounds ------------------------------------------------------------------------------------------------

MAX_DURATION = 30.0  # the longest a request holds its lease
# One engine's removal: its stop's grace, retried while the runtime is away (stop_retry, pauses up to 5 s),
# with its last lines read first (5 s at most).
CLEANUP = TIMEOUTS["stop_timeout"] + OPTIONS.stop_retry + 10.0
STATE_BOUNDS: dict[ModelState, float] = {
    # the removal of what an earlier engine left, the start itself, then the clean-up of a failed start
    S.STARTING: TIMEOUTS["start_timeout"] + 3 * CLEANUP,
    S.WAKING: TIMEOUTS["wake_timeout"] + 2 * CLEANUP,
    # a stop that took over an operation waits for that operation's clean-up, then removes the engine
    S.STOPPING: 4 * CLEANUP,
}
# A request: a slot (max_concurrent), a drain that holds it back (max_hold, then the busy ones finish), its turn
# in the queue (max_wait), a stop of what ran, then a start or wake and its clean-up; then its own duration.
REQUEST_BOUND = (QUEUE.max_hold + MAX_DURATION + QUEUE.max_wait + STATE_BOUNDS[S.STOPPING]
                 + STATE_BOUNDS[S.STARTING] + TIMEOUTS["wake_timeout"] + 30.0)
ANSWERS = (ModelNotFound, QueueFull, NoRoom, ShuttingDown, StartFailed)  # gateway/errors.py maps each one
SETTLE_LIMIT = 3600.0  # virtual seconds one step may take before it counts as stuck
EPSILON = 1e-6


def _same(a: ModelSpec, b: ModelSpec) -> bool:
    return a.model_dump(exclude={"source"}) == b.model_dump(exclude={"source"})


async def boot(vt: VirtualTime, runtime: SimRuntime, specs: Iterable[ModelSpec],
               capacity: Mapping[str, float] = NODES, events: EventLog | None = None) -> Waker:
    """A started waker over `runtime`, in `vt`'s time, with the simulation's options: each node's budget is
    `capacity` GB and only the ledger limits (no live memory probe)."""
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.DOCKER: runtime},
                  budgets={n: Budget(gb, 0.0) for n, gb in capacity.items()},
                  probes={n: FixedProbe(None) for n in capacity}, clock=vt.clock,
                  events=events if events is not None else EventLog(keep=100_000), queue=QUEUE,
                  engine_api=SimEngineApi(runtime), options=OPTIONS, labels={})
    await waker.start()
    return waker


@dataclasses.dataclass(eq=False)
class Call:
    """One request (or admin operation) and how it ended."""

    number: int
    what: str  # "request" or an admin operation
    model: str
    began: float
    bound: float  # virtual seconds it may take, at most
    outcome: str | None = None  # "answered", "refused" (a WakerError), "client_gone", or "bug"
    error: BaseException | None = None
    ended: float | None = None

    def end(self, outcome: str, now: float, error: BaseException | None = None) -> None:
        self.outcome, self.error, self.ended = outcome, error, now

    def __repr__(self) -> str:
        how = f"{self.outcome} at {self.ended:g}" if self.ended is not None else "running"
        error = f": {type(self.error).__name__}: {self.error}" if self.error is not None else ""
        return f"<{self.what} {self.number} {self.model} from {self.began:g}, {how}{error}>"


class WatchedEvents(EventLog):
    """The waker's event log, remembering the events that say something went wrong inside."""

    def __init__(self) -> None:
        super().__init__(keep=100_000)
        self.internal_errors: list[Event] = []
        self.emitted = 0

    def emit(self, event: Event) -> None:
        super().emit(event)
        self.emitted += 1
        if event.kind == "internal_error":
            self.internal_errors.append(event)


# ERROR logs of known defects (a part of the message -> the regression test that shows it): tolerated until fixed.
KNOWN_ERRORS: dict[str, str] = {}


class ErrorLogs(logging.Handler):
    """ERROR records of the waker's loggers: each one is a failure caught and logged instead of raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]!r}"
        if not any(known in text for known in KNOWN_ERRORS):
            self.records.append(f"{record.name}: {text}")


# Tasks of the waker's own whose failure nobody may see: an operation's error is retrieved by the controller
# (expected ones are WakerErrors), a loop's is logged at most.
_OPS = {op.value for op in Op}
_LOOPS = ("idle reaper", "admission ", "preload")


class WakerSimulation(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.vt = VirtualTime()
        self.vt.loop.set_task_factory(self._new_task)
        self.runtime = SimRuntime(tuple(NODES), default=NORMAL)
        self.events = WatchedEvents()
        self.logs = ErrorLogs()
        logging.getLogger("sparkgate").addHandler(self.logs)
        self.hidden: list[str] = []  # failures out of sight: operation tasks and loops ending with odd errors
        self.specs: dict[str, ModelSpec] = {name: CATALOGUE[name] for name in FIRST}
        self.calls: list[Call] = []
        self.outcomes: set[str] = set()  # how requests ended (kinds and error classes), for statistics
        # Engines on nodes that were unreachable when the waker booted, and since when their model may take them
        # over (their nodes answer and it has no engine of its own): see `_not_found_yet`.
        self.unseen: dict[SimEngine, float | None] = {}
        self.numbers = itertools.count(1)
        self.waker: Waker = self.run(self._boot(NODES))

    # -- driving the loop ----------------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.vt.run(coro, limit=SETTLE_LIMIT)

    def _new_task(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                  **kwargs: Any) -> "asyncio.Task[Any]":
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
        task.add_done_callback(self._task_ended)
        return task

    def _task_ended(self, task: "asyncio.Task[Any]") -> None:
        name = task.get_name()
        if task.cancelled() or not (name.partition(" ")[0] in _OPS or name.startswith(_LOOPS)):
            return
        error = task.exception()
        if error is not None and not isinstance(error, WakerError):
            self.hidden.append(f"task {name!r} failed at {self.vt.now():g}: {error!r}")

    async def _boot(self, capacity: Mapping[str, float]) -> Waker:
        return await boot(self.vt, self.runtime, self.specs.values(), capacity, self.events)

    def _spawn(self, call: Call, work: Coroutine[Any, Any, Any], leaves_after: float | None = None) -> None:
        """Run `work` as a task that records how `call` ends; its client leaves (cancels it) after `leaves_after`."""

        async def recorded() -> None:
            try:
                await work
            except WakerError as exc:
                call.end("refused", self.vt.now(), exc)
            except asyncio.CancelledError:
                call.end("client_gone", self.vt.now())
                raise
            except Exception as exc:
                call.end("bug", self.vt.now(), exc)
            else:
                call.end("answered", self.vt.now())

        async def begin() -> None:
            task = asyncio.create_task(recorded(), name=f"client {call.number} {call.what} {call.model}")
            if leaves_after is not None:
                asyncio.get_running_loop().call_later(leaves_after, task.cancel)

        self.calls.append(call)
        self.run(begin())

    def _call(self, what: str, model: str, bound: float) -> Call:
        return Call(next(self.numbers), what, model, self.vt.now(), bound)

    # -- requests ------------------------------------------------------------------------------------------

    @rule(model=st.sampled_from(sorted(CATALOGUE)), stream=st.booleans(),
          duration=st.sampled_from([0.0, 0.5, 3.0, 12.0, MAX_DURATION]),
          leaves_after=st.none() | st.sampled_from([0.0, 0.2, 2.0, 8.0, 25.0]))
    def request(self, model: str, stream: bool, duration: float, leaves_after: float | None) -> None:
        spec = self.specs.get(model)
        # Requests for a model with max_concurrent wait for the ones ahead of them as well.
        bound = (duration + REQUEST_BOUND) * (1 + (spec.max_waiting if spec and spec.max_concurrent else 0))
        call = self._call("request", model, bound)
        self._spawn(call, self._request(self.waker, call, stream, duration), leaves_after)

    @rule(models=st.lists(st.sampled_from(sorted(CATALOGUE)), min_size=2, max_size=4),
          duration=st.sampled_from([0.0, 3.0, 12.0]), leaves_after=st.none() | st.sampled_from([1.0, 8.0]))
    def requests_at_once(self, models: list[str], duration: float, leaves_after: float | None) -> None:
        for model in models:
            self.request(model, False, duration, leaves_after)

    async def _request(self, waker: Waker, call: Call, stream: bool, duration: float) -> None:
        """What the gateway's proxy does with the waker (gateway/proxy.py: run, _acquire); the engine's answer
        takes `duration`."""
        gate = waker.gate(call.model)
        if gate.limited:
            async with gate.slot():
                await self._lease(gate, call, stream, duration)
        else:
            await self._lease(gate, call, stream, duration)

    async def _lease(self, gate: Gate, call: Call, stream: bool, duration: float) -> None:
        endpoint = await (self._acquire_streaming(gate) if stream and not gate.ready_now() else gate.acquire())
        try:
            self._check_endpoint(call, endpoint)
            await asyncio.sleep(duration)
        finally:
            gate.release()

    @staticmethod
    async def _acquire_streaming(gate: Gate) -> Endpoint:
        """A streaming client waiting for a cold model: the acquire runs beside the keep-alive comments."""
        acquiring = asyncio.ensure_future(gate.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({acquiring}, timeout=KEEPALIVE)
                if done:
                    return acquiring.result()
        except BaseException:
            if not acquiring.done():
                acquiring.cancel()
            elif not acquiring.cancelled() and acquiring.exception() is None:
                gate.release()  # acquired just as the client left
            raise

    def _check_endpoint(self, call: Call, endpoint: Endpoint) -> None:
        engine = self.runtime.engine(endpoint.api_base.removesuffix("/v1"))
        assert endpoint.spec.name == call.model, f"{call} was given {endpoint.spec.name}'s engine"
        assert engine is not None and engine.spec.name == call.model, f"{call} was given {engine!r}"
        # An engine that exited this very instant is the proxy's 502; one that is asleep or loading is a bug.
        assert engine.state in (EngineState.READY, EngineState.EXITED), f"{call} was given {engine!r}"

    # -- admin operations ----------------------------------------------------------------------------------

    @rule(model=st.sampled_from(sorted(CATALOGUE)))
    def admin_stop(self, model: str) -> None:
        self._spawn(self._call("stop", model, STATE_BOUNDS[S.STOPPING] + STATE_BOUNDS[S.STARTING]),
                    self.waker.stop(model))

    @rule(model=st.sampled_from(sorted(CATALOGUE)))
    def admin_warm(self, model: str) -> None:
        self._spawn(self._call("warm", model, REQUEST_BOUND), self.waker.warm(model))

    @rule(model=st.sampled_from(sorted(CATALOGUE)))
    def admin_sleep(self, model: str) -> None:
        async def sleep() -> None:
            with contextlib.suppress(ModelNotFound):
                self.waker.sleep(model)

        self.run(sleep())

    @rule(model=st.sampled_from(sorted(CATALOGUE)), pinned=st.booleans())
    def admin_pin(self, model: str, pinned: bool) -> None:
        async def pin() -> None:
            with contextlib.suppress(ModelNotFound):
                self.waker.pin(model, pinned)

        self.run(pin())

    @rule(model=st.sampled_from(sorted(CATALOGUE)))
    def admin_stop_while_the_engine_is_created(self, model: str) -> None:
        """A start that takes long in the runtime, and a stop while it is being made."""
        self.runtime.script(model, START_FAULTS["slow_creation"])
        self.admin_warm(model)
        self.run(advance(2.0))
        self.admin_stop(model)

    # -- models.d ------------------------------------------------------------------------------------------

    def _reload(self, specs: dict[str, ModelSpec]) -> None:
        try:
            self.run(self.waker.reload(Registry(list(specs.values()))))
        except ConfigError:
            return  # refused as a whole (a model the budgets can't hold): nothing changed
        self.specs = specs

    @rule(model=st.sampled_from(sorted(CATALOGUE)), variant=st.sampled_from([0, 1]))
    def reload_add(self, model: str, variant: int) -> None:
        """Add a model (or add back one being removed), maybe with other args than it had."""
        spec = CATALOGUE[model]
        if variant:
            spec = spec.model_copy(update={"args": ("--variant", str(variant))})
        self._reload({**self.specs, model: spec})

    @rule(model=st.sampled_from(sorted(CATALOGUE)))
    def reload_remove(self, model: str) -> None:
        if model in self.specs and len(self.specs) > 1:
            self._reload({name: spec for name, spec in self.specs.items() if name != model})

    @rule(model=st.sampled_from(sorted(CATALOGUE)), memory_gb=st.sampled_from([5.0, 15.0, 30.0, 45.0, 65.0, 90.0]))
    def reload_memory(self, model: str, memory_gb: float) -> None:
        """Change memory_gb: policy only (the same engine), unless it changes where the model may run."""
        if model not in self.specs:
            return
        self._reload({**self.specs, model: self.specs[model].model_copy(update={"memory_gb": memory_gb})})

    @rule(model=st.sampled_from(sorted(CATALOGUE)), variant=st.sampled_from([1, 2, 3]))
    def reload_args(self, model: str, variant: int) -> None:
        """Change args: the engine is shaped differently, so it is recreated (once idle)."""
        if model in self.specs:
            args = ("--variant", str(variant))
            self._reload({**self.specs, model: self.specs[model].model_copy(update={"args": args})})

    # -- faults --------------------------------------------------------------------------------------------

    @rule(model=st.sampled_from(sorted(CATALOGUE)), fault=st.sampled_from(sorted(START_FAULTS)))
    def next_start_misbehaves(self, model: str, fault: str) -> None:
        self.runtime.script(model, START_FAULTS[fault])

    @rule(model=st.sampled_from(sorted(CATALOGUE)), fault=st.sampled_from(ENGINE_FAULTS))
    def running_engine_misbehaves(self, model: str, fault: str) -> None:
        """`model`'s running engines (loading, ready or asleep) crash now, or from now on ignore SIGTERM, or (with a
        sleep mode) fail or exit at their next wake, or fail to fall asleep."""
        for engine in (e for e in self.runtime.running() if e.spec.name == model):
            self.run(self._misbehave(engine, fault))

    @staticmethod
    async def _misbehave(engine: SimEngine, fault: str) -> None:
        if fault == "crash":
            engine.crash(139)
        elif fault == "exit_on_wake":
            engine.behaviour.exit_on_wake = 1
        elif fault == "fail_wake":
            engine.behaviour.fail_wake = True
        elif fault == "garbled_wake":
            engine.behaviour.garbled = True
        elif fault == "fail_sleep":
            engine.behaviour.fail_sleep = True
        else:
            engine.behaviour.ignores_sigterm = True

    @rule(fault=st.sampled_from(["crash", "exit_on_wake", "fail_wake", "garbled_wake", "slow_wake", None]))
    def a_sleeping_engine_is_woken(self, fault: str | None) -> None:
        """A request for a model whose engine sleeps, the engine maybe misbehaving as it is woken (or crashing
        asleep just before)."""
        for m in self.waker.describe().models:
            engine = m.engine
            if m.state is S.SLEEPING and isinstance(engine, SimEngine) and engine.state is EngineState.ASLEEP:
                if fault == "slow_wake":
                    engine.behaviour.wake_time = START_FAULTS["slow_to_wake"].wake_time
                elif fault is not None:
                    self.run(self._misbehave(engine, fault))
                self.request(m.name, False, 1.0, None)
                return

    @rule(nodes=st.sampled_from([("a",), ("b",), ("a", "b")]), seconds=st.sampled_from([1.0, 4.0, 15.0, 60.0]))
    def runtime_outage(self, nodes: tuple[str, ...], seconds: float) -> None:
        """The runtime can't be reached on `nodes` for `seconds`: short outages end within a stop's retries
        (stop_retry), long ones outlast them."""

        async def down() -> None:
            self.runtime.down(*nodes)
            asyncio.get_running_loop().call_later(seconds, self.runtime.up, *nodes)

        self.run(down())

    @rule(capacity_a=st.sampled_from([100.0, 75.0]), changed=st.none() | st.sampled_from(sorted(CATALOGUE)))
    def gateway_restart(self, capacity_a: float, changed: str | None) -> None:
        """The gateway stops (engines stay: the runtime is detached, like Docker) and a new one adopts them, maybe
        with node a's budget lowered meanwhile, and maybe with a model's args `changed` in models.d (its engine
        is stale: removed, not adopted)."""
        self.run(self.waker.shutdown())
        if changed in self.specs:
            self.specs = {**self.specs, changed: self.specs[changed].model_copy(update={"args": ("--variant", "9")})}
        capacity = {**NODES, "a": capacity_a}
        try:
            self.waker = self.run(self._boot(capacity))
        except ConfigError:  # models.d no longer fits the lower budget: started with the old one
            self.waker = self.run(self._boot(NODES))
        # Engines on nodes unreachable now can't be found before those nodes answer again.
        self.unseen = {e: None for e in self.runtime.running() if not self.runtime.reachable(e.nodes)}

    @rule(seconds=st.sampled_from([0.0, 0.3, 1.0, 2.5, 6.0, 15.0, 40.0, 120.0]))
    def time_passes(self, seconds: float) -> None:
        self.run(advance(seconds))

    @rule()
    def faults_end_and_every_model_serves(self) -> None:
        """The runtime is back, no fault is left to play out and nothing is pinned: once time passes, every model
        is stable and a request for each one, one after the other, is answered."""
        self.runtime.unscript()
        for engine in self.runtime.engines:
            b = engine.behaviour
            b.exit_on_wake, b.fail_wake, b.fail_sleep, b.garbled = None, False, False, False
            b.sleep_time, b.wake_time = NORMAL.sleep_time, NORMAL.wake_time

        async def recover() -> None:
            self.runtime.up()
            for name in self.specs:
                self.waker.pin(name, False)

        self.run(recover())
        for _ in range(120):
            if self._quiet():
                # Quiet for a whole round of the reaper, which settles what reloads left pending: nothing happens.
                before = self.events.emitted
                self.run(advance(OPTIONS.reap_interval))
                if self._quiet() and self.events.emitted == before:
                    break
            else:
                self.run(advance(5.0))
        self.check_every_call_ends_well()
        unstable = [c for c in self.waker.controllers() if c.state in TRANSITIONAL or c.operation is not None]
        assert not unstable, "still busy after the faults ended:\n" + self._describe()
        self.check_models_d_applied()
        retry_at = max((c.retry_at or 0.0 for c in self.waker.controllers()), default=0.0)
        if retry_at > self.vt.now():
            self.run(advance(retry_at - self.vt.now()))
        for name in sorted(self.specs):
            call = self._call("request", name, REQUEST_BOUND)
            self._spawn(call, self._request(self.waker, call, False, 0.1))
            while call.outcome is None and self.vt.now() - call.began <= call.bound:
                self.run(advance(1.0))
            assert call.outcome == "answered", f"after the faults ended: {call}\n" + self._describe()

    def check_models_d_applied(self) -> None:
        """Once nothing runs: the models are those of the last models.d (removed ones forgotten), each with its
        entry as it is now, and every engine that runs was launched from that entry (a changed one was recreated,
        one added back while being removed too)."""
        status = self.waker.describe()
        assert sorted(m.name for m in status.models) == sorted(self.specs), self._describe()
        for m in status.models:
            assert not m.pending_reload and _same(m.spec, self.specs[m.name]), f"{m.name}: {m.spec!r}"
            engine = m.engine
            if isinstance(engine, SimEngine) and engine.holds_memory:
                launched = engine_for(m.spec.engine).launch_hash(m.spec)
                assert engine.spec.spec_hash() == launched, f"{m.name} runs {engine!r}, launched from an older entry " \
                    f"(args {engine.spec.args}, now {m.spec.args})\n" + self._describe()

    def _quiet(self) -> bool:
        return (all(c.outcome is not None for c in self.calls)
                and all(c.state not in TRANSITIONAL and c.operation is None for c in self.waker.controllers()))

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def check_ledgers(self) -> None:
        status = self.waker.describe()
        for node in status.nodes:
            held = self.waker.admissions[node.name].held_gb()
            assert held <= node.capacity_gb + EPSILON, \
                f"node {node.name}: {held} of {node.capacity_gb} GB held\n" + self._describe()
            by_models = sum(m.held_on.get(node.name, 0.0) for m in status.models)
            assert abs(held - by_models) < EPSILON, f"node {node.name}: ledger {held}, models {by_models}\n" \
                + self._describe()
            unseen = self._not_found_yet()
            truth = sum(e.held_gb for e in self.runtime.engines if node.name in e.nodes and e not in unseen)
            assert truth <= held + EPSILON, f"node {node.name}: engines hold {truth} GB, the ledger {held}\n" \
                + self._describe()

    @invariant()
    def check_transitions_end(self) -> None:
        now = self.vt.now()
        for c in self.waker.controllers():
            if c.state not in TRANSITIONAL:
                continue
            op = c.operation
            assert op is not None and not op.done(), f"{c.name} is {c.state} with no operation\n" + self._describe()
            assert now - c.since <= STATE_BOUNDS[c.state], \
                f"{c.name} has been {c.state} for {now - c.since:g} s\n" + self._describe()

    @invariant()
    def check_engines_are_the_models(self) -> None:
        status = self.waker.describe()
        tracked = {id(m.engine): m.name for m in status.models if m.engine is not None}
        unseen = self._not_found_yet()
        for engine in self.runtime.running():
            if engine in unseen:
                continue
            owner = tracked.get(id(engine))
            assert owner == engine.spec.name, f"{engine!r} runs, and its model's controller does not know it " \
                f"(tracked by {owner})\n" + self._describe()
        for m in status.models:
            if m.state not in (S.READY, S.SLEEPING):
                continue
            engine = m.engine
            assert isinstance(engine, SimEngine), f"{m.name} is {m.state} without an engine\n" + self._describe()
            if not self.runtime.reachable(engine.nodes):
                continue  # its exit, if any, is not reported before the runtime is back
            falling_asleep = self.waker.controller(m.name).operation is not None
            expected = {S.READY: (EngineState.READY,),
                        S.SLEEPING: (EngineState.READY, EngineState.ASLEEP) if falling_asleep
                        else (EngineState.ASLEEP,)}[m.state]
            assert engine.state in expected, f"{m.name} is {m.state} but its engine is {engine!r}\n" \
                + self._describe()

    @invariant()
    def check_every_call_ends_well(self) -> None:
        now = self.vt.now()
        for call in self.calls:
            if call.outcome is None:
                assert now - call.began <= call.bound, f"{call} has not ended after {now - call.began:g} s\n" \
                    + self._describe()
            elif call.outcome == "bug" or (call.outcome == "refused" and not isinstance(call.error, ANSWERS)):
                raise AssertionError(f"{call} ended badly") from call.error
        for call in self.calls:
            if call.outcome is not None and call.what == "request":
                self.outcomes.add(call.outcome if call.error is None else type(call.error).__name__)
        self.calls = [c for c in self.calls if c.outcome is None]
        assert not self.hidden, "\n".join(self.hidden)
        assert not self.logs.records, "\n".join(self.logs.records)
        assert not self.events.internal_errors, self.events.internal_errors
        assert not self.vt.unhandled, self.vt.unhandled

    def _not_found_yet(self) -> set[SimEngine]:
        """The engines on nodes unreachable when the waker booted that it may not have found yet: their nodes are
        still away, or came back less than a rediscovery ago (the reaper looks every `rediscover_interval`).

        A request for their model meanwhile uses such an engine when it starts on that node (as Docker does:
        test_regressions.py::test_a_request_as_soon_as_the_node_is_back_starts_no_second_engine); started on
        another node, it runs beside it until the rediscovery removes one of the two, so they are not counted
        against the ledger meanwhile."""
        now = self.vt.now()
        models = {m.name: m for m in self.waker.describe().models}
        waiting = []
        for engine, since in list(self.unseen.items()):
            model = models.get(engine.spec.name)
            if not engine.holds_memory or (model is not None and model.engine is engine):
                del self.unseen[engine]  # gone, or found
                continue
            if not self.runtime.reachable(engine.nodes):
                self.unseen[engine] = None
                waiting.append(engine)
                continue
            if since is None:
                self.unseen[engine] = since = now
            # A rediscovery leaves a model alone while an operation runs (it may be taking this very engine): the
            # wait counts from its last transition too.
            controller = self.waker.controller(model.name) if model is not None else None
            if controller is not None:
                if controller.operation is not None:
                    waiting.append(engine)
                    continue
                since = max(since, controller.since)
            if now - since <= OPTIONS.rediscover_interval + OPTIONS.reap_interval + 1:
                waiting.append(engine)
        return set(waiting)

    # -- the end of a run -----------------------------------------------------------------------------------

    def teardown(self) -> None:
        failing = sys.exc_info()[0] is not None
        try:
            if not failing:
                self._report_coverage()
                self.faults_end_and_every_model_serves()
                self.check_every_call_ends_well()
        finally:
            try:
                self.run(self.waker.shutdown())
            except Exception:
                if not failing:
                    raise
            finally:
                self.vt.close()
                logging.getLogger("sparkgate").removeHandler(self.logs)

    def _report_coverage(self) -> None:
        """What this run went through, for `pytest --hypothesis-show-statistics` (the share of runs that saw each)."""
        seen = set()
        for e in self.events.recent():
            seen.add(f"{e.source} -> {e.target}" if e.kind == "transition" else e.kind)
        for outcome in self.outcomes:
            seen.add(f"request {outcome}")
        if currently_in_test_context():  # a scenario replayed by hand has no statistics
            for what in sorted(seen):
                event(what)

    def _describe(self) -> str:
        """The waker and the world at this instant, for failure messages."""
        status = self.waker.describe()
        lines = [f"t={self.vt.now():g}; unreachable: {sorted(self.runtime.unreachable)}"]
        for n in status.nodes:
            lines.append(f"  node {n.name}: {n.held_gb:g} of {n.capacity_gb:g} GB held")
        for m in status.models:
            c = self.waker.controller(m.name)
            op = c.operation
            lines.append(f"  {m.name}: {m.state} since {m.since:g} held_on={dict(m.held_on)} placed={m.placed} "
                         f"engine={m.engine!r} op={op.get_name() if op else None} in_flight={m.in_flight} "
                         f"waiting={m.waiting} pending={m.pending_reload} removed={m.removed}")
        for e in self.runtime.engines:
            if not e.removed or e.holds_memory:
                lines.append(f"  engine {e!r} on {e.nodes}: {'; '.join(e.lines[-4:])}")
        return "\n".join(lines)


def replay(steps: str) -> WakerSimulation:
    """Run the steps of a failing case as hypothesis prints them ("state.request(model='big', ...)", one a line;
    other lines are ignored), checking the invariants after each, then the teardown; returns the machine, whose
    `events` and `_describe()` tell the story. Shrinking gives up after five minutes and may leave steps that do
    nothing: replaying a case by hand, step by step, is how it becomes a scenario in test_regressions.py:

        .venv/bin/python -m tests.sim.machine failing.txt
    """
    machine = WakerSimulation()
    invariants = [machine.check_ledgers, machine.check_transitions_end, machine.check_engines_are_the_models,
                  machine.check_every_call_ends_well]
    for check in invariants:
        check()
    for line in steps.splitlines():
        step = line.strip().removeprefix("|").strip()
        if not step.startswith("state.") or step.startswith(("state.check_", "state.teardown")):
            continue
        eval(step, {"state": machine})  # the steps hypothesis printed for this very machine
        for check in invariants:
            check()
    machine.teardown()
    return machine


if __name__ == "__main__":
    replay(Path(sys.argv[1]).read_text())
    print("passed")


__all__ = ["CATALOGUE", "NODES", "NORMAL", "OPTIONS", "START_FAULTS", "WakerSimulation", "boot", "docker_model",
           "replay", "vllm_model"]
