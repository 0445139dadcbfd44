"""The sampler: every few seconds, each running engine's memory into the store.

Why sample at all: ``memory_gb`` in models.d is a guess, and the budget is only as good as the guesses. What an engine
really takes (and how high it peaks while loading: vLLM's profiling run, CUDA graph capture) is measured here, so the
budget can learn it (:mod:`stats.learned`) and ``sparkgate stats`` can show it.

The sampler reads the waker only through its read model (``waker.describe()``), and an engine only through the
protocols its handle implements (waker.runtime.base): ``ProcessGroupEngine`` (a process group here: procfs) and
``ContainerEngine`` (the runtime reads the container's cgroup). Every read is blocking (procfs, Docker API, NVML)
and runs off the event loop: procfs and NVML in a worker thread, container reads in the runtime's own threads, so a
slow daemon never delays requests.

On a unified-memory node those per-engine readings miss what CUDA allocates (stats/store.py), so the sampler also
feeds every round to a :class:`~stats.unified.StartWatch`, which records what the machine loses over each cold start
that ran alone (stats/unified.py).

Sampling is optional: when the database can't be written (a full disk, a file gone read-only) a round fails, the
error is logged once (again only if it changes), and the next round waits twice as long, up to ``max_backoff``; the
first round that works again says so and brings the interval back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from stats.readers import (
    gpu_memory_by_pid,
    open_nvml,
    process_groups,
    sum_memory,
    system_available,
)
from stats.store import Drop, Sample, SampleStore
from stats.unified import ADOPTING, DEFAULT_SETTLE, StartWatch, machine_rounds, unified_machines
from waker.clock import Clock, SystemClock
from waker.config.nodes import NodeConfig
from waker.events import Event
from waker.runtime.base import ContainerEngine, ProcessGroupEngine
from waker.runtime.memory import GIB
from waker.state import ModelState
from waker.status import ModelStatus, WakerStatus

log = logging.getLogger("sparkgate.stats")

PHASE_OF_STATE = {ModelState.STARTING: "load", ModelState.WAKING: "load", ModelState.READY: "steady",
                  ModelState.SLEEPING: "sleep"}
"""States whose engine is up (STOPPING is left out: the engine is going away, and what it frees says nothing about
what it needs)."""

_PRUNE_EVERY = 3600.0


class Described(Protocol):
    """What the sampler reads of a ``waker.waker.Waker``: its read model."""

    def describe(self) -> WakerStatus:
        ...


class RecentEvents(Protocol):
    """What the sampler reads of a ``waker.events.EventLog``: a model's recent events (to tell an adoption from a
    start)."""

    def recent(self, model: str | None = None) -> list[Event]:
        ...


@dataclass(slots=True)
class _Target:
    """One engine to read this round, taken from one status so its state and engine agree."""

    model: str
    phase: str
    spec_hash: str
    declared_gb: float | None = None  # memory_gb as declared (None: auto)
    pgid: int | None = None  # an engine that is a process group here
    container: ContainerEngine | None = None  # an engine in a container
    local: bool = True  # NVML and MemAvailable describe this machine: meaningful only for engines on it
    rss: int | None = None
    pss: int | None = None
    cgroup: int | None = None
    pids: tuple[int, ...] = ()


class Sampler:
    """Reads every running engine's memory every ``interval`` seconds into ``store``.

    ``waker`` is a ``waker.waker.Waker`` (anything with ``describe()``). ``nvml``: the pynvml module or a stand-in;
    None opens pynvml on the first round (a box with no NVIDIA GPU then records no GPU figures); False turns GPU
    readings off. ``retention``: samples older than this many seconds are deleted once an hour (None keeps
    everything). ``nodes``: the resolved nodes (their ``unified_memory``), whose unified ones get their starts
    watched; ``events``: the waker's event log, which tells an adoption from a start there; ``settle``: seconds of
    READY watched after a start. ``sleep`` waits between rounds and ``available`` reads this machine's MemAvailable in
    bytes (tests pass their own).
    """

    def __init__(self, waker: Described, store: SampleStore, interval: float = 5.0, clock: Clock | None = None, *,
                 nvml: Any = None, retention: float | None = 90 * 86400.0,
                 nodes: Mapping[str, NodeConfig] | None = None, events: RecentEvents | None = None,
                 settle: float = DEFAULT_SETTLE, max_backoff: float = 300.0,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 available: Callable[[], int | None] = system_available) -> None:
        if interval <= 0:
            raise ValueError("the sampling interval must be positive")
        self._waker = waker
        self.store = store
        self.interval = interval
        self._clock = clock or SystemClock()
        self._nvml = nvml
        self._nvml_opened = nvml is not None
        self.retention = retention
        self.latest: dict[str, float] = {}
        self.error: str | None = None  # why the last round failed; None while sampling works
        self.max_backoff = max(max_backoff, interval)
        self._sleep = sleep
        self._available = available
        self._machines = unified_machines(nodes or {})
        self._events = events
        self._watch = StartWatch(settle, adopted=self._adopted)
        self._unwritten: list[Drop] = []
        self._last_prune: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="memory sampler")

    async def close(self) -> None:
        """Stop sampling (the store stays open: its owner closes it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        delay = self.interval
        said: set[str] = set()  # errors logged since the last round that worked
        while True:
            try:
                await self.sample_once()
                await self._prune_now_and_then()
            except Exception as exc:  # a bad round must not end sampling
                self.error = f"{type(exc).__name__}: {exc}"
                delay = min(self.max_backoff, max(2 * delay, 2 * self.interval))
                if self.error not in said:
                    said.add(self.error)
                    # A full disk or a locked file is the machine's state, not a bug: no traceback for those.
                    log.warning("memory sampling failed: %s (said once; retrying every %gs at most)", self.error,
                                self.max_backoff, exc_info=not isinstance(exc, sqlite3.Error | OSError))
            else:
                if self.error is not None:
                    log.warning("memory sampling works again (after: %s)", self.error)
                    said.clear()
                self.error = None
                delay = self.interval
            await self._sleep(delay)

    async def sample_once(self) -> list[Sample]:
        """One round: read every engine that is up, store and return the samples; on unified memory, also feed the
        start watch and store the drops it ends."""
        status = self._waker.describe()
        targets = [t for t in map(_target, status.models) if t is not None]
        if not targets and not self._machines:
            return []
        await asyncio.gather(*(self._read_container(t) for t in targets if t.container is not None))
        gpu_by_pid, available = await asyncio.to_thread(self._read_local, targets)
        now = self._clock.wall()
        if self._machines:
            self._unwritten += self._watch.observe(now, machine_rounds(status, self._machines, _gib(available)))
        samples = []
        for t in targets:
            gpu = None
            if gpu_by_pid is not None and t.local and t.pids:
                gpu = sum(gpu_by_pid.get(pid, 0) for pid in set(t.pids))
            if t.rss is None and t.pss is None and t.cgroup is None and gpu is None:
                continue  # gone between the state check and the read: no figure is better than a zero
            samples.append(Sample(
                ts=now, model=t.model, phase=t.phase, rss=_gib(t.rss), pss=_gib(t.pss), cgroup=_gib(t.cgroup),
                gpu=_gib(gpu), system_available=_gib(available) if t.local else None, spec_hash=t.spec_hash,
                declared_gb=t.declared_gb,
            ))
        await asyncio.to_thread(self.store.add, samples)
        if self._unwritten:  # kept until written: a drop is rare (one per lone cold start) and worth a retry
            await asyncio.to_thread(self.store.add_drops, self._unwritten)
            self._unwritten = []
        # The last round's footprints, for the gateway's live-memory gauge.
        self.latest = {sample.model: sample.footprint for sample in samples if sample.footprint is not None}
        return samples

    def _adopted(self, model: str) -> bool:
        """Whether ``model``'s latest start is an adoption (an engine found running): the machine loses nothing."""
        if self._events is None:
            return False
        for event in reversed(self._events.recent(model)):
            if event.kind == "transition" and event.target == ModelState.STARTING.value:
                return event.reason.startswith(ADOPTING)
        return False

    async def _read_container(self, target: _Target) -> None:
        assert target.container is not None
        try:
            reading = await target.container.container_memory(with_pids=target.local and self._nvml is not False)
        except Exception as exc:  # container gone, daemon unreachable: this round has no figure for it
            log.debug("no memory reading for %s: %s", target.model, exc)
            return
        target.cgroup, target.pids = reading.cgroup_bytes, reading.pids

    def _read_local(self, targets: list[_Target]) -> tuple[dict[int, int] | None, int | None]:
        """procfs and NVML, in one worker thread: one /proc scan for every process group, one NVML query."""
        groups = process_groups([t.pgid for t in targets if t.pgid is not None])
        for t in targets:
            if t.pgid is None:
                continue
            t.pids = tuple(groups.get(t.pgid, ()))
            reading = sum_memory(t.pids)
            if reading is not None:
                t.rss, t.pss = reading
        gpu = None
        if any(t.pids and t.local for t in targets):
            gpu = gpu_memory_by_pid(self._open_nvml())
        return gpu, self._available()

    def _open_nvml(self) -> Any | None:
        if not self._nvml_opened:
            self._nvml_opened = True
            self._nvml = open_nvml() or False
            log.info("per-process GPU memory: %s", "NVML" if self._nvml else "not available (no NVML or no GPU)")
        return self._nvml or None

    async def _prune_now_and_then(self) -> None:
        if self.retention is None:
            return
        now = self._clock.wall()
        if self._last_prune is None or now - self._last_prune >= _PRUNE_EVERY:
            self._last_prune = now
            await asyncio.to_thread(self.store.prune, now - self.retention)


def _target(status: ModelStatus) -> _Target | None:
    phase = PHASE_OF_STATE.get(status.state)
    engine = status.engine
    if phase is None or engine is None:
        return None
    # NVML and MemAvailable are this machine's: they say nothing about engines on another Docker host, nor about a
    # model spanning several nodes.
    local = status.placed in ((), ("local",))
    target = _Target(model=status.name, phase=phase, spec_hash=status.spec.spec_hash(), local=local,
                     declared_gb=None if status.spec.memory_auto else status.spec.memory_gb)
    if isinstance(engine, ContainerEngine):
        target.container = engine
    elif isinstance(engine, ProcessGroupEngine):
        target.pgid = engine.process_group
        target.local = True  # a process engine is always on this machine
    else:
        return None  # external endpoints, groups of containers: nothing of theirs to read here
    return target


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB
