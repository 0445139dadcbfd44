"""The Waker: every model's controller, seat and gate; leases by name; admin operations; models.d reloads;
engines adopted at boot; the idle reaper; clean shutdown; and `describe()`, the one read model.

Use as `async with waker:`; then `async with waker.lease(name) as endpoint: ...`.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import aiohttp

from waker.clock import Clock, SystemClock
from waker.config.registry import ConfigError, Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.registry import engine_for
from waker.errors import ModelNotFound, WakerError
from waker.events import Event, EventLog
from waker.gate import Endpoint, Gate
from waker.lifecycle.controller import ModelController
from waker.lifecycle.engine_api import EngineApi, HttpEngineApi
from waker.options import WakerOptions
from waker.runtime.base import Adopter, Found, Runtime, RuntimeUnavailable
from waker.runtime.memory import FixedProbe, make_probe
from waker.scheduling.budget import Budget, MemoryProbe
from waker.scheduling.cluster import ClusterAdmission
from waker.scheduling.effects import Usage
from waker.scheduling.node import NodeAdmission, QueuePolicy
from waker.scheduling.placement import budget_problems, candidates
from waker.scheduling.reaper import idle_stops
from waker.scheduling.seat import Seat
from waker.state import Hold, ModelState
from waker.status import Admission, ModelStatus, NodeStatus, WakerStatus

S = ModelState
log = logging.getLogger("sparkgate.waker")


class _Effects:
    """What the scheduling executors may read of the models and do to them (scheduling.effects.Effects)."""

    def __init__(self, controllers: Mapping[str, ModelController]) -> None:
        self._controllers = controllers
        self.seats: Mapping[str, Seat] = {}

    def usage(self, model: str) -> Usage:
        c = self._controllers[model]
        return Usage(c.state, c.hold, c.in_flight, c.waiting, c.last_used)

    def start(self, model: str, nodes: tuple[str, ...]) -> bool:
        c = self._controllers.get(model)
        if c is None:
            return False
        if c.state is S.SLEEPING:
            return c.begin_wake()
        seat = self.seats.get(model)
        where = f" on {', '.join(nodes)}" if seat is not None and not seat.fixed else ""
        return c.begin_start(nodes, f"request for a model that is not running{where}")

    def evict(self, model: str, reason: str, *, ignore_waiting: bool) -> bool:
        c = self._controllers.get(model)
        return c is not None and c.stop_if_idle(reason, ignore_waiting=ignore_waiting) is not None


class Waker:
    """See the module docstring."""

    def __init__(
        self,
        registry: Registry,
        *,
        runtimes: Mapping[RuntimeKind, Runtime],
        options: WakerOptions | None = None,
        clock: Clock | None = None,
        events: EventLog | None = None,
        budgets: Mapping[str, Budget] | None = None,
        probes: Mapping[str, MemoryProbe] | None = None,
        queue: QueuePolicy | None = None,
        preload: Sequence[str] = (),
        engine_api: EngineApi | None = None,
        labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.registry = registry
        self.options = options or WakerOptions()
        self.clock = clock or SystemClock()
        self.events = events or EventLog()
        self.budgets = dict(budgets) if budgets is not None else {"local": Budget()}
        self.labels = {name: dict((labels or {}).get(name, {})) for name in self.budgets}
        self._runtimes = dict(runtimes)
        problems = budget_problems(registry.values(), self.budgets, self.labels)
        for name in preload:
            if name not in registry.routes():
                problems.append(f"preload: {name!r} is not a model in models.d")
        if problems:
            raise ConfigError(problems)
        self._preload = [registry.resolve(name).name for name in preload]
        self._engine_api = engine_api
        self._session: aiohttp.ClientSession | None = None
        self._controllers: dict[str, ModelController] = {}
        self._gates: dict[str, Gate] = {}
        self._spec_pinned: dict[str, bool] = {}  # `pinned` as models.d last said, per model
        # Live memory is read where the gateway runs; other nodes rely on their ledger (or the probe given).
        given = dict(probes or {})
        self._probes = {n: given.get(n) or (make_probe("auto") if n == "local" else FixedProbe(None))
                        for n in self.budgets}
        effects = _Effects(self._controllers)
        self.scheduler = ClusterAdmission(self.budgets, self._probes, effects, self.clock, self.events, queue)
        effects.seats = self.scheduler.seats
        self._reload_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._preloader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Waker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def admissions(self) -> dict[str, NodeAdmission]:
        """Each node's admission (for tests and tools; the gateway reads `describe()`)."""
        return self.scheduler.nodes

    # -- start and shutdown -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine_api is None:
            self._session = aiohttp.ClientSession()
            self._engine_api = HttpEngineApi(self._session, self.options.probe_interval, self.options.probe_timeout)
        for probe in self._probes.values():
            start = getattr(probe, "start", None)
            if start is not None:
                start()  # a remote node's probe reads in the background: a reading is ready before it is needed
        for spec in self.registry.values():
            await self._add(spec)
        await self._adopt_running_engines()
        self.scheduler.start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="idle reaper")
        if self._preload:
            self._preloader = asyncio.create_task(self._preload_in_order(), name="preload")

    async def shutdown(self) -> None:
        """Stop everything this waker started; no engine process outlives the gateway (containers are left
        running for the next gateway to adopt)."""
        for task in (self._reaper, self._preloader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.scheduler.close()
        results = await asyncio.gather(*(c.close() for c in self._controllers.values()), return_exceptions=True)
        for controller, result in zip(self._controllers.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("stopping %s failed: %r", controller.name, result)
        if self._session is not None:
            await self._session.close()
        for probe in self._probes.values():
            close = getattr(probe, "close", None)
            if close is not None:
                close()
        for runtime in self._runtimes.values():
            close = getattr(runtime, "close", None)
            if close is not None:
                close()

    async def _add(self, spec: ModelSpec) -> None:
        runtime = self._runtimes.get(spec.runtime)
        if runtime is None:
            raise ValueError(f"{spec.name}: runtime {spec.runtime} is not available in this gateway")
        assert self._engine_api is not None, "the waker has not started"
        name = spec.name
        controller = ModelController(spec, engine_for(spec.engine), runtime, self._engine_api, self.events,
                                     self.clock, self.options, on_change=lambda: self._changed(name))
        self._controllers[name] = controller
        if spec.manages_lifecycle:
            nodes = candidates(spec, self.budgets, self.labels)
            self.scheduler.register(name, nodes, spec.nodes, spec.memory_gb, spec.sleeping_gb, spec.priority,
                                    spec.pinned)
            self._spec_pinned[name] = spec.pinned
            self._gates[name] = Gate(controller, self.scheduler, self.clock)
        else:
            self._gates[name] = Gate(controller, None, self.clock)
            controller.mark_external(await runtime.start(spec, engine_for(spec.engine)))

    def _changed(self, name: str) -> None:
        controller = self._controllers.get(name)
        if controller is not None and controller.engine_gone:
            self._sync_seat(controller)  # a new entry applied as its engine went: its seat follows
        self.scheduler.changed(name)

    async def _preload_in_order(self) -> None:
        """Start the preload list at boot, one after the other (each through admission)."""
        for name in self._preload:
            try:
                await self.gate(name).warm()
                self.events.emit(Event(self.clock.wall(), name, "preloaded", reason="listed in preload"))
            except WakerError as exc:
                log.warning("preload of %s failed: %s", name, exc)

    # -- engines found at boot ----------------------------------------------------------------------------

    async def _adopt_running_engines(self) -> None:
        """Engines left running by a previous gateway are taken over, never restarted, as far as each node's
        budget holds them (pinned first, then by priority); stale ones (spec changed, model gone from models.d,
        over the budget) are stopped and reported.

        Run at boot, then every `rediscover_interval` by the reaper: a node unreachable at boot is looked at
        again once it answers, so the engines there are adopted or removed, never left running untracked
        (tests/sim/test_regressions.py::test_engines_on_a_node_unreachable_at_boot_are_tracked_once_it_is_back).
        Only models with no engine and no operation are considered: an engine the waker starts right now is
        found by the runtime before the start returns, and must be left alone."""
        seen = {name: (c.since, c.starts) for name, c in self._controllers.items()}
        found: list[tuple[Adopter, Found]] = []
        for runtime in {id(r): r for r in self._runtimes.values()}.values():
            if not isinstance(runtime, Adopter):
                continue
            try:
                found += [(runtime, f) for f in await runtime.discover()]
            except RuntimeUnavailable as exc:
                log.warning("could not look for running engines: %s", exc)

        def rank(item: tuple[Adopter, Found]) -> tuple[int, int, str]:
            spec = self.registry.get(item[1].model)
            return (0 if spec and spec.pinned else 1, -(spec.priority if spec else 0), item[1].model)

        taken: set[str] = set()
        for runtime, engine in sorted(found, key=rank):
            controller = self._controllers.get(engine.model)
            if engine.model in taken:  # this pass adopted one of its engines already
                await self._discard(runtime, engine, "a second engine of the model (one runs already)")
                continue
            if controller is not None and (controller.closed
                                           or seen.get(engine.model) != (controller.since, controller.starts)):
                continue  # something happened to it while we looked: look again next time
            if controller is not None and self._another_engine(controller, engine):
                await self._discard(runtime, engine, "a second engine of the model (one runs already)")
            elif controller is None or controller.idle_stopped:
                if await self._take_over(runtime, engine):
                    taken.add(engine.model)

    @staticmethod
    def _another_engine(controller: ModelController, found: Found) -> bool:
        """`found` is not `controller`'s engine, and the controller is settled on one (an engine the waker starts
        right now is found by the runtime before the start returns: a model with an operation running is left
        alone)."""
        engine = controller.engine
        return (engine is not None and controller.operation is None and engine.ident != found.handle.ident
                and controller.state in (S.READY, S.SLEEPING, S.FAILED))

    async def _take_over(self, runtime: Adopter, found: Found) -> bool:
        """Adopt `found` for its model, or remove it as stale; True when adopted."""
        spec = self.registry.get(found.model)
        controller = self._controllers.get(found.model)
        seat = self.scheduler.seats.get(found.model)
        if spec is None or controller is None or seat is None or controller.retired:
            stale = "its model is no longer in models.d"
        elif engine_for(spec.engine).launch_hash(spec) != found.spec_hash:
            stale = "its model's spec changed"
        elif not found.running:
            if spec.keep_container and found.reusable:
                return False  # kept stopped on purpose: reused by the next start
            # A half group of parts (one missing or ended) serves nothing and may hold memory: removed, kept or not.
            stale = "stopped and not kept" if found.reusable else "an incomplete group of parts (one missing or ended)"
        elif not controller.idle_stopped:
            stale = "another engine of the model was taken over already"
        else:
            sleeping = await self._is_sleeping(spec, found)
            if not controller.idle_stopped:  # a request started it while we asked
                stale = "another engine of the model was started meanwhile"
            else:
                hold = Hold.SLEEPING if sleeping else Hold.FULL
                nodes = found.nodes or seat.placed or seat.candidates[: spec.nodes]
                if any(n not in seat.candidates for n in nodes):
                    stale = f"it runs on {', '.join(nodes)}, where models.d no longer lets it run"
                elif not self.scheduler.fits(spec.name, nodes, hold):
                    held = ", ".join(f"{n}: {self.scheduler.nodes[n].held_gb():g} of "
                                     f"{self.scheduler.nodes[n].budget.capacity_gb:g} GB held" for n in nodes)
                    stale = f"it does not fit the memory budget any more ({held})"
                else:
                    self.scheduler.adopted(spec.name, nodes)
                    controller.adopt(runtime.claim(found, spec), nodes, sleeping)
                    return True
        await self._discard(runtime, found, stale)
        return False

    async def _discard(self, runtime: Adopter, found: Found, why: str) -> None:
        self.events.emit(Event(self.clock.wall(), found.model, "stale_engine",
                               reason=f"{found.handle.ident}: {why}; removed"))
        try:
            await runtime.discard(found, why)
        except Exception as exc:  # a stale container must not stop the gateway from starting
            log.warning("could not remove stale engine %s: %s", found.handle.ident, exc)

    async def _is_sleeping(self, spec: ModelSpec, found: Found) -> bool:
        """Whether an engine found running sleeps: its own answer (vLLM's `/is_sleeping`: its `/health` answers 200
        asleep too), or for engines that can't tell (SGLang) the note the gateway that put it to sleep kept with it."""
        call = engine_for(spec.engine).sleep_state_call(spec)
        if call is None or self._engine_api is None:
            return bool(found.asleep)
        return bool(await self._engine_api.is_sleeping(found.handle.root_url, call))

    # -- requests ------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelSpec:
        return self.registry.resolve(name)

    def gate(self, name: str) -> Gate:
        """The way requests go into `name` (a model or an alias); ModelNotFound if there is none."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates.get(self.registry.resolve(name).name)
            if gate is None:
                raise ModelNotFound(f"The model '{name}' does not exist", model=name)
        return gate

    def controller(self, name: str) -> ModelController:
        """The controller of `name` (for tests and tools: the gateway reads `describe()`)."""
        return self.gate(name).controller

    def controllers(self) -> list[ModelController]:
        return list(self._controllers.values())

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Endpoint]:
        async with self.gate(name).lease() as endpoint:
            yield endpoint

    # -- admin operations ---------------------------------------------------------------------------------

    async def stop(self, name: str, reason: str = "asked to stop") -> None:
        await self.controller(name).stop(reason)

    def sleep(self, name: str, reason: str = "asked to sleep") -> bool:
        """Put `name` to sleep if it is idle and READY; False otherwise."""
        return self.controller(name).sleep_if_idle(reason) is not None

    def pin(self, name: str, pinned: bool) -> None:
        spec = self.resolve(name)
        if spec.manages_lifecycle:
            self.scheduler.pin(spec.name, pinned)

    async def warm(self, name: str) -> None:
        """Bring `name` up through admission, like a request would; failures are in its state and events."""
        with contextlib.suppress(WakerError):
            await self.gate(name).warm()

    async def logs(self, name: str, lines: int) -> tuple[str, ...]:
        return await self.controller(name).log_tail(lines)

    # -- the read model ------------------------------------------------------------------------------------

    def describe(self) -> WakerStatus:
        """Every model and node, read in one synchronous step (so the figures agree with each other)."""
        scheduler = self.scheduler
        models = []
        for name, c in self._controllers.items():
            seat = scheduler.seats.get(name)
            models.append(ModelStatus(
                name=name, spec=c.spec, state=c.state, since=c.since, in_flight=c.in_flight, waiting=c.waiting,
                queued=scheduler.queued(name) if seat else 0, last_used=c.last_used, ready_since=c.ready_since,
                failures=c.failures, retry_at=c.retry_at, last_error=c.last_error,
                pinned=seat.pinned if seat else False, nodes=seat.candidates if seat else (),
                placed=seat.placed if seat else (), held_on=scheduler.held_on(name) if seat else {},
                engine=c.engine, pending_reload=c.pending_spec is not None, removed=c.retired, starts=c.starts,
                admission=_admission(scheduler, name) if seat else Admission(),
                typical_start_s=c.typical_start_s, typical_wake_s=c.typical_wake_s,
            ))
        nodes = tuple(
            NodeStatus(name=n, capacity_gb=a.budget.capacity_gb, total_gb=a.budget.total_gb,
                       reserve_gb=a.budget.reserve_gb, held_gb=a.held_gb(), queued=a.queued,
                       live_free_gb=a.probe.free_gb(), probe=a.probe.name, high_water_gb=a.high_water_gb,
                       labels=self.labels.get(n, {}))
            for n, a in scheduler.nodes.items())
        return WakerStatus(now=self.clock.now(), models=tuple(models), nodes=nodes, routes=self.registry.routes())

    def statuses(self) -> list[ModelStatus]:
        return list(self.describe().models)

    # -- models.d ------------------------------------------------------------------------------------------

    async def reload_from(self, load: Callable[[], Registry]) -> dict[str, list[str]]:
        """Read models.d with `load` (in a thread) and apply it; reloads (file watch, SIGHUP, admin API) run one at
        a time, each reading the files after the one before applied them, so an older snapshot can never be
        applied last (tests/unit/test_reload.py::test_concurrent_reloads_apply_the_newest_files_last)."""
        async with self._reload_lock:
            registry = await asyncio.to_thread(load)
            return await self._apply(registry)

    async def reload(self, registry: Registry) -> dict[str, list[str]]:
        """Take a new models.d without disturbing what runs: unchanged models keep their engines, policy-only
        changes apply at once (a running engine keeps the memory it was admitted with), changed models are
        recreated when idle, removed ones are stopped when idle. A registry the budgets can't hold is refused
        (ConfigError) and nothing changes."""
        async with self._reload_lock:
            return await self._apply(registry)

    async def _apply(self, registry: Registry) -> dict[str, list[str]]:
        problems = budget_problems(registry.values(), self.budgets, self.labels)
        for spec in registry.values():
            if spec.runtime not in self._runtimes:
                problems.append(f"{spec.source or spec.name}: runtime {spec.runtime} is not available")
        if problems:
            raise ConfigError(problems)
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "updated": [], "unchanged": []}
        self.registry = registry
        for name, spec in registry.items():
            controller = self._controllers.get(name)
            if controller is None:
                await self._add(spec)
                report["added"].append(name)
            elif controller.retired:
                # Added back while its engine is still being removed: compared with the engine it runs, so a
                # changed entry still recreates it (it used to keep the old engine for good).
                controller.retire(False)
                self._update(controller, spec)
                report["added"].append(name)
            else:
                report[self._update(controller, spec)].append(name)
        for name, controller in list(self._controllers.items()):
            if name in registry or controller.retired:
                continue
            controller.retire()
            report["removed"].append(name)
            if controller.spec.manages_lifecycle:
                # Requests queued for it learn at once that it is gone (they used to wait until max_wait).
                self.scheduler.withdraw_all(name, "it was removed from models.d")
                if controller.state is S.FAILED:
                    await controller.stop("removed from models.d")
        self.events.emit(Event(self.clock.wall(), "*", "reload", reason="models.d reloaded",
                               data={k: v for k, v in report.items() if v and k != "unchanged"}))
        self.settle_reload()
        return report

    def _update(self, controller: ModelController, spec: ModelSpec) -> str:
        """Apply `spec` to a model that has an entry already; returns the report's key."""
        if _same(controller.spec, spec):
            if controller.pending_spec is None:
                return "unchanged"
            controller.set_pending(None)  # back to what runs: nothing to recreate
            return "updated"
        if self._same_engine(controller.spec, spec):
            controller.set_pending(None)
            controller.replace_spec(spec)
            self._sync_seat(controller)
            return "updated"
        controller.set_pending(spec)  # applied at once when no engine runs
        if controller.pending_spec is not None:
            controller.stop_if_idle("models.d changed: recreating with the new entry")
        else:
            self._sync_seat(controller)
        return "changed"

    def _same_engine(self, a: ModelSpec, b: ModelSpec) -> bool:
        return (a.runtime == b.runtime and a.engine == b.engine
                and engine_for(a.engine).launch_hash(a) == engine_for(b.engine).launch_hash(b)
                and candidates(a, self.budgets, self.labels) == candidates(b, self.budgets, self.labels))

    def _sync_seat(self, controller: ModelController) -> None:
        """The seat and the gate follow the controller's entry: its nodes (once it holds nothing anywhere), its
        footprint, priority and max_concurrent (at once), and its pin when models.d changed it (a pin set through
        the admin API stays until then)."""
        spec = controller.spec
        gate = self._gates.get(spec.name)
        if gate is not None:
            gate.limiter.resize(spec.max_concurrent, spec.max_waiting)  # in place: never two limits at once
        seat = self.scheduler.seats.get(spec.name)
        if seat is None or not spec.manages_lifecycle:
            return
        self.scheduler.move(spec.name, candidates(spec, self.budgets, self.labels), spec.nodes)
        pinned = seat.pinned if self._spec_pinned.get(spec.name) == spec.pinned else spec.pinned
        self._spec_pinned[spec.name] = spec.pinned
        self.scheduler.update(spec.name, footprint_gb=spec.memory_gb, sleeping_gb=spec.sleeping_gb,
                              priority=spec.priority, pinned=pinned)

    def settle_reload(self) -> None:
        """Finish what reloads left pending: models that were busy are recreated once idle; removed ones are
        dropped once stopped. Called after a reload and by the reaper loop."""
        for name, controller in list(self._controllers.items()):
            if controller.pending_spec is not None:
                if controller.apply_pending():
                    self._sync_seat(controller)
                else:
                    controller.stop_if_idle("models.d changed: recreating with the new entry")
            if not controller.retired:
                continue
            if not controller.spec.manages_lifecycle or (controller.idle_stopped and self.scheduler.unregister(name)):
                del self._controllers[name]
                self._gates.pop(name, None)
                self._spec_pinned.pop(name, None)
            elif controller.state is S.FAILED:
                controller.begin_reap()
            else:
                controller.stop_if_idle("removed from models.d")

    # -- the idle reaper -----------------------------------------------------------------------------------

    async def reap_once(self) -> None:
        """Stop (or put to sleep) the models idle past their idle_timeout, and retry removing what failed engines
        left behind once their runtime answers again; returns once those operations have ended."""
        await asyncio.gather(*self._reap(), return_exceptions=True)

    def _reap(self) -> list["asyncio.Task[object]"]:
        stopping = []
        for decision in idle_stops(self.describe().models, self.clock.now()):
            controller = self._controllers[decision.model]
            if decision.sleep:
                task, kind = controller.sleep_if_idle(decision.reason), "idle_sleep"
            else:
                task, kind = controller.stop_if_idle(decision.reason), "idle_stop"
            if task is not None:
                self.events.emit(Event(self.clock.wall(), decision.model, kind, reason=decision.reason))
                stopping.append(task)
        now = self.clock.now()
        for controller in self._controllers.values():
            if controller.residue is not None and (controller.retry_at is None or now >= controller.retry_at):
                controller.begin_reap()
        return stopping

    async def _reap_forever(self) -> None:
        next_discovery = self.clock.now() + self.options.rediscover_interval
        while True:
            await asyncio.sleep(self.options.reap_interval)
            try:
                self.settle_reload()
                self._reap()  # not awaited: a stop with its runtime away may take stop_retry
                if self.clock.now() >= next_discovery:
                    next_discovery = self.clock.now() + self.options.rediscover_interval
                    await self._adopt_running_engines()
            except Exception:  # the reaper must survive one bad stop
                log.exception("idle reaper")


def _admission(scheduler: ClusterAdmission, model: str) -> Admission:
    """`model`'s latest ask for room as its owner, the cluster admission, holds it (seat.Admission), for the read
    model."""
    a = scheduler.admission(model)
    return Admission(outcome=a.outcome.value if a.outcome is not None else None, reason=a.reason, since=a.since,
                     attempt=a.attempt, node=a.node, position=a.position, waiting_for=a.waiting_for)


def _same(a: ModelSpec, b: ModelSpec) -> bool:
    return a.model_dump(exclude={"source"}) == b.model_dump(exclude={"source"})


__all__ = ["Waker"]
