"""The sampler: every few seconds, each running engine's memory into the store.

Why sample at all: ``memory_gb`` in models.d is a guess, and the budget is only as good as the guesses. What an engine
really takes (and how high it peaks while loading: vLLM's profiling run, CUDA graph capture) is measured here, so the
budget can learn it (:mod:`stats.learned`) and ``sparkgate stats`` can show it.

The sampler reads the waker only through its read model (``waker.describe()``), and an engine only through the
protocols its handle implements (waker.runtime.base): ``ProcessGroupEngine`` (a process group here: procfs) and
``ContainerEngine`` (the runtime reads the container's cgroup). Every read is blocking (procfs, Docker API, NVML)
and runs off the event loop: procfs and NVML in a worker thread, container reads in the runtime's own threads, so a
slow daemon never delays requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from stats.readers import (
    gpu_memory_by_pid,
    open_nvml,
    process_groups,
    sum_memory,
    system_available,
)
from stats.store import Sample, SampleStore
from waker.clock import Clock, SystemClock
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


@dataclass(slots=True)
class _Target:
    """One engine to read this round, taken from one status so its state and engine agree."""

    model: str
    phase: str
    spec_hash: str
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
    readings off. ``retention``: samples older than this many
    seconds are deleted once an hour (None keeps everything).
    """

    def __init__(self, waker: Described, store: SampleStore, interval: float = 5.0, clock: Clock | None = None, *,
                 nvml: Any = None, retention: float | None = 90 * 86400.0) -> None:
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
        while True:
            try:
                await self.sample_once()
                await self._prune_now_and_then()
            except Exception:  # a bad round must not end sampling
                log.exception("memory sampling")
            await asyncio.sleep(self.interval)

    async def sample_once(self) -> list[Sample]:
        """One round: read every engine that is up, store and return the samples."""
        targets = [t for t in map(_target, self._waker.describe().models) if t is not None]
        if not targets:
            return []
        await asyncio.gather(*(self._read_container(t) for t in targets if t.container is not None))
        gpu_by_pid, available = await asyncio.to_thread(self._read_local, targets)
        now = self._clock.wall()
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
            ))
        await asyncio.to_thread(self.store.add, samples)
        # The last round's footprints, for the gateway's live-memory gauge.
        self.latest = {sample.model: sample.footprint for sample in samples if sample.footprint is not None}
        return samples

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
        return gpu, system_available()

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
    target = _Target(model=status.name, phase=phase, spec_hash=status.spec.spec_hash(), local=local)
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
