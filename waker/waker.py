"""The Waker: every model's controller, leases by name, the idle reaper, and clean shutdown."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial

import aiohttp

from waker.clock import Clock, SystemClock
from waker.config.registry import ConfigError, Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.registry import engine_for
from waker.errors import WakerError
from waker.events import Event, EventLog
from waker.lifecycle.controller import Endpoint, ModelController, ModelStatus
from waker.lifecycle.engine_api import Prober, ReadinessProber
from waker.options import WakerOptions
from waker.runtime.base import Adopter, Found, Runtime, RuntimeUnavailable
from waker.runtime.docker.host import DockerNode
from waker.runtime.docker.runtime import DockerRuntime
from waker.runtime.external import ExternalRuntime
from waker.runtime.memory import FixedProbe, MemoryProbe, make_probe
from waker.runtime.process import ProcessRuntime
from waker.scheduling.budget import Budget
from waker.scheduling.cluster import ClusterAdmission
from waker.scheduling.node import NodeAdmission, QueuePolicy
from waker.scheduling.placement import budget_problems, candidates
from waker.scheduling.reaper import idle_stops
from waker.sleep import launch_spec
from waker.state import ModelState

log = logging.getLogger("sparkgate.waker")


def _required(prober: Prober | None) -> Prober:
    assert prober is not None, "the waker has not started"
    return prober


def _same(a: ModelSpec, b: ModelSpec) -> bool:
    return a.model_dump(exclude={"source"}) == b.model_dump(exclude={"source"})


def default_runtimes(
    options: WakerOptions, nodes: Mapping[str, DockerNode] | None = None, instance: str = "default"
) -> dict[RuntimeKind, Runtime]:
    return {
        RuntimeKind.PROCESS: ProcessRuntime(keep_log_lines=max(200, options.log_tail_lines)),
        RuntimeKind.EXTERNAL: ExternalRuntime(),
        RuntimeKind.DOCKER: DockerRuntime(nodes, instance=instance),
    }


class Waker:
    """Use as `async with waker:`; then `async with waker.lease(name) as endpoint: ...`."""

    def __init__(
        self,
        registry: Registry,
        *,
        runtimes: Mapping[RuntimeKind, Runtime] | None = None,
        options: WakerOptions | None = None,
        clock: Clock | None = None,
        events: EventLog | None = None,
        budgets: Mapping[str, Budget] | None = None,
        probes: Mapping[str, MemoryProbe] | None = None,
        queue: QueuePolicy | None = None,
        preload: Sequence[str] = (),
        prober: Prober | None = None,
        labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.registry = registry
        self.options = options or WakerOptions()
        self.clock = clock or SystemClock()
        self.events = events or EventLog()
        self._runtimes = dict(runtimes) if runtimes is not None else default_runtimes(self.options)
        self.budgets = dict(budgets) if budgets is not None else {"local": Budget()}
        self.labels = {name: dict((labels or {}).get(name, {})) for name in self.budgets}
        problems = budget_problems(registry.values(), self.budgets, self.labels)
        for name in preload:
            if name not in registry.routes():
                problems.append(f"preload: {name!r} is not a model in models.d")
        if problems:
            raise ConfigError(problems)
        self._probes = dict(probes or {})
        self._queue_policy = queue or QueuePolicy()
        self._preload = [registry.resolve(name).name for name in preload]
        self._prober = prober
        self._prober_in_use: Prober | None = None
        self._session: aiohttp.ClientSession | None = None
        self._controllers: dict[str, ModelController] = {}
        self.admissions: dict[str, NodeAdmission] = {}
        self.cluster = ClusterAdmission(self.admissions, self.clock, self.events)
        self._reaper: asyncio.Task[None] | None = None
        self._preloader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Waker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        prober = self._prober or ReadinessProber(
            self._session, self.options.probe_interval, self.options.probe_timeout
        )
        for node, budget in self.budgets.items():
            # Live memory is read where the gateway runs; other nodes rely on their ledger alone.
            probe = self._probes.get(node) or (make_probe("auto") if node == "local" else FixedProbe(None))
            self.admissions[node] = NodeAdmission(node, budget, probe, self.clock, self.events, self._queue_policy)
            start = getattr(probe, "start", None)
            if start is not None:
                start()  # a remote node's probe reads in the background: a reading is ready before it is needed
        self._prober_in_use = prober
        for spec in self.registry.values():
            await self._add_controller(spec)
        await self._adopt_running_engines()
        for admission in self.admissions.values():
            admission.start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="idle reaper")
        if self._preload:
            self._preloader = asyncio.create_task(self._preload_in_order(), name="preload")

    async def _preload_in_order(self) -> None:
        """Start the preload list at boot, one after the other (each through admission)."""
        for name in self._preload:
            try:
                await self._controllers[name].ensure_ready()
                self.events.emit(Event(self.clock.wall(), name, "preloaded", reason="listed in preload"))
            except WakerError as exc:
                log.warning("preload of %s failed: %s", name, exc)

    async def _add_controller(self, spec: ModelSpec) -> ModelController:
        runtime = self._runtimes.get(spec.runtime)
        if runtime is None:
            raise ValueError(f"{spec.name}: runtime {spec.runtime} is not available in this gateway")
        nodes = candidates(spec, self.budgets, self.labels)
        if isinstance(runtime, DockerRuntime):
            for node in nodes:
                runtime.node(node)  # an unknown node is a config error, found at boot
        controller = ModelController(
            spec, engine_for(spec.engine), runtime, _required(self._prober_in_use), self.events, self.clock,
            self.options, admission=self.cluster if spec.manages_lifecycle else None,
            on_change=partial(self.cluster.kick_nodes, nodes) if spec.manages_lifecycle else None,
            session=self._session, nodes=nodes,
        )
        self._controllers[spec.name] = controller
        if spec.manages_lifecycle:
            for node in nodes:
                self.admissions[node].register(controller)
        else:
            controller.mark_ready_external(await runtime.start(spec, engine_for(spec.engine)))
        return controller

    def _sync_placement(self, controller: ModelController) -> None:
        """After models.d changed: register the model with the nodes its entry now allows (once it is stopped)."""
        nodes = candidates(controller.spec, self.budgets, self.labels) if controller.spec.manages_lifecycle else ()
        if nodes == controller.candidates or controller.state not in (ModelState.STOPPED, ModelState.FAILED):
            return
        for node in controller.candidates:
            if node in self.admissions:
                self.admissions[node].unregister(controller.spec.name)
        controller.candidates = nodes
        controller.placed = nodes if len(nodes) == controller.spec.nodes else ()
        controller.reserved.clear()
        controller.set_on_change(partial(self.cluster.kick_nodes, nodes))
        for node in nodes:
            self.admissions[node].register(controller)

    async def reload(self, registry: Registry) -> dict[str, list[str]]:
        """Take a new models.d without disturbing what runs: unchanged models keep their engines,
        policy-only changes apply at once, changed models are recreated when idle, removed ones are
        stopped when idle. A registry the budgets can't hold is refused (ConfigError) and nothing
        changes."""
        problems = budget_problems(registry.values(), self.budgets, self.labels)
        for spec in registry.values():
            if spec.runtime not in self._runtimes:
                problems.append(f"{spec.source or spec.name}: runtime {spec.runtime} is not available")
        if problems:
            raise ConfigError(problems)
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "updated": [], "unchanged": []}
        old = self.registry
        self.registry = registry
        for name, spec in registry.items():
            controller = self._controllers.get(name)
            if controller is None or controller.retired:
                if controller is not None:  # re-added while still retiring: keep its engine
                    controller.retired = False
                    self._controllers[name].replace_spec(spec)
                else:
                    await self._add_controller(spec)
                report["added"].append(name)
                continue
            before = old.get(name, controller.spec)
            if _same(before, spec):
                report["unchanged"].append(name)
            elif launch_spec(before).spec_hash() == launch_spec(spec).spec_hash() and before.runtime == spec.runtime \
                    and candidates(before, self.budgets, self.labels) == candidates(spec, self.budgets, self.labels):
                controller.replace_spec(spec)
                report["updated"].append(name)
            else:
                controller.pending_spec = spec
                if not controller.apply_pending_spec():
                    controller.stop_if_idle("models.d changed: recreating with the new entry")
                report["changed"].append(name)
        for name in list(self._controllers):
            if name not in registry:
                controller = self._controllers[name]
                controller.retired = True
                report["removed"].append(name)
                if controller.spec.manages_lifecycle:
                    controller.stop_if_idle("removed from models.d")
                    if controller.state is ModelState.FAILED:
                        await controller.stop("removed from models.d")
        self.events.emit(Event(self.clock.wall(), "*", "reload", reason="models.d reloaded",
                               data={k: v for k, v in report.items() if v and k != "unchanged"}))
        await self.settle_reload()
        return report

    async def settle_reload(self) -> None:
        """Finish what reload left pending: models that were busy are stopped once idle; retired
        ones are dropped once stopped. Called after reload and by the reaper loop."""
        for name, controller in list(self._controllers.items()):
            if controller.pending_spec is not None and not controller.apply_pending_spec():
                controller.stop_if_idle("models.d changed: recreating with the new entry")
            if controller.retired:
                if controller.state in (ModelState.STOPPED, ModelState.FAILED) or not controller.spec.manages_lifecycle:
                    del self._controllers[name]
                    for node in controller.candidates:
                        if node in self.admissions:
                            self.admissions[node].unregister(name)
                else:
                    controller.stop_if_idle("removed from models.d")
            else:
                self._sync_placement(controller)

    async def _adopt_running_engines(self) -> None:
        """Engines left running by a previous gateway are taken over, never restarted; stale ones
        (spec changed, model gone from models.d) are stopped and reported."""
        for runtime in {id(r): r for r in self._runtimes.values()}.values():
            if not isinstance(runtime, Adopter):
                continue
            try:
                found = await runtime.discover()
            except RuntimeUnavailable as exc:
                log.warning("could not look for running engines: %s", exc)
                continue
            for engine in found:
                await self._take_over(runtime, engine)

    async def _take_over(self, runtime: Adopter, found: Found) -> None:
        spec = self.registry.get(found.model)
        if spec is None:
            stale = "its model is no longer in models.d"
        elif found.spec_hash != launch_spec(spec).spec_hash():
            stale = "its model's spec changed"
        elif found.running:
            self._controllers[spec.name].adopt(found.handle, found.nodes)
            return
        elif spec.keep_container:
            return  # kept stopped on purpose: reused by the next start
        else:
            stale = "stopped and not kept"
        self.events.emit(Event(self.clock.wall(), found.model, "stale_engine",
                               reason=f"{found.handle.ident}: {stale}; removed"))
        try:
            await runtime.discard(found, stale)
        except Exception as exc:  # a stale container must not stop the gateway from starting
            log.warning("could not remove stale engine %s: %s", found.handle.ident, exc)

    async def shutdown(self) -> None:
        """Stop everything this waker started; no engine process outlives the gateway."""
        for task in (self._reaper, self._preloader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for admission in self.admissions.values():
            await admission.close()
        results = await asyncio.gather(*(c.close() for c in self._controllers.values()), return_exceptions=True)
        for controller, result in zip(self._controllers.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("stopping %s failed: %r", controller.spec.name, result)
        if self._session is not None:
            await self._session.close()
        for admission in self.admissions.values():
            close = getattr(admission.probe, "close", None)
            if close is not None:
                close()
        for runtime in self._runtimes.values():
            close = getattr(runtime, "close", None)
            if close is not None:
                close()

    def resolve(self, name: str) -> ModelSpec:
        return self.registry.resolve(name)

    def controller(self, name: str) -> ModelController:
        return self._controllers[self.registry.resolve(name).name]

    def controllers(self) -> list[ModelController]:
        return list(self._controllers.values())

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Endpoint]:
        async with self.controller(name).lease() as endpoint:
            yield endpoint

    async def stop(self, name: str, reason: str = "asked to stop") -> None:
        await self.controller(name).stop(reason)

    def statuses(self) -> list[ModelStatus]:
        return [c.status() for c in self._controllers.values()]

    async def reap_once(self) -> None:
        stopping = []
        for decision in idle_stops(self.statuses(), self.clock.now()):
            controller = self._controllers[decision.model]
            if decision.sleep:
                task = controller.sleep_if_idle(decision.reason)
                kind = "idle_sleep"
            else:
                task = controller.stop_if_idle(decision.reason)
                kind = "idle_stop"
            if task is not None:
                self.events.emit(Event(self.clock.wall(), decision.model, kind, reason=decision.reason))
                stopping.append(task)
        await asyncio.gather(*stopping, return_exceptions=True)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.reap_interval)
            try:
                await self.settle_reload()
                await self.reap_once()
            except Exception:  # the reaper must survive one bad stop
                log.exception("idle reaper")
