"""Footprints on unified memory, from what the machine loses while one model starts.

On a GB10 (DGX Spark) the GPU allocates from the same pool as the CPU, and CUDA allocations show in neither a
process's RSS/PSS nor its container's memory cgroup, while NVML gives no per-process figure at all: a vLLM engine
holding 70 GB is sampled as the few GB of its host side. What the machine loses can be seen: ``MemAvailable`` falls
by what the engine takes. So on a unified-memory node the sampler watches each cold start and records a
:class:`~stats.store.Drop`:

    drop = MemAvailable just before the start - its lowest reading over the load and the first ``settle`` seconds
    ready

The drop belongs to the model only if nothing else changed on that machine meanwhile, so a watch is kept only while
the model starts *alone*:

* it begins in a round where exactly one model went from no engine (stopped, failed, or not placed there) to
  STARTING or READY, and every other model on the machine is in the state it had the round before, with no start,
  wake or stop in progress (a model in STARTING, WAKING or STOPPING);
* the baseline (the round before) must be settled: the round before it had no operation in progress either, and
  MemAvailable rose by less than :data:`STEADY_GIB` between the two. Memory a stopped engine gives back can take
  seconds to come back on a GB10; a baseline taken while it still comes back would make the drop too small (the
  unsafe side), so a start right after an eviction is not measured;
* it is discarded if, before the model is seen READY, another model on the machine changes state or begins an
  operation, the model itself fails or is stopped, or the machine's reading is missing; after READY such a change
  ends the watch early, with the rounds before it (the load is over: only the settling minutes are cut short);
* two models that start in the same round are both left unwatched; a wake is never watched (it takes back only what
  its sleep gave up, not the whole footprint), nor a model spanning several nodes (each loses its share), nor an
  adoption (the engine was running before: the machine loses nothing); a drop of zero or less is discarded.

Local nodes share this machine's ``MemAvailable``, so they are one machine here: a start on one of them and a stop on
another overlap. A remote unified node is its own machine, read through its Docker memory probe (the node's
``/proc/meminfo``); with another probe its drops are unknown. Memory taken meanwhile by an engine already running
(a KV cache that grows with its requests) is counted in: an overestimate, the safe side. Memory taken or given back
by something the gateway does not run (a notebook, the page cache beyond what MemAvailable counts as reclaimable)
cannot be told apart: the learned figure keeps its margin (stats/learned.py) for that, among other things.

:class:`StartWatch` is pure (it is fed one :class:`MachineRound` per machine per sampling round); the sampler builds
the rounds from the waker's read model with :func:`machine_rounds`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stats.store import Drop
from waker.config.nodes import NodeConfig
from waker.state import TRANSITIONAL, ModelState
from waker.status import WakerStatus

log = logging.getLogger("sparkgate.stats")

S = ModelState
HERE = "(this machine)"
"""The machine key of every local node: they all share this machine's MemAvailable."""

DEFAULT_SETTLE = 120.0
"""Seconds of READY still watched after a start: engines that allocate lazily (llama.cpp's KV cache, vLLM's
first batches) take more in their first minutes of serving."""

STEADY_GIB = 1.0
"""How much MemAvailable may rise over the round before a baseline for the baseline to count as settled."""

ADOPTING = "adopting"
"""How the reason of an adoption's transition begins (waker/lifecycle/controller.py ``ModelController.adopt``)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One model on one machine in one round: what the watch compares between rounds."""

    state: ModelState
    engine: bool  # it has an engine (which may hold memory whatever its state says)
    node: str  # the node it runs on (the head node of a spanning model)
    spec_hash: str
    spans: bool = False  # placed on several nodes


@dataclass(frozen=True, slots=True)
class MachineRound:
    """One machine at one sampling round: its MemAvailable (GiB; None: not read) and the models placed on it."""

    available: float | None
    models: Mapping[str, Seen]


Signature = frozenset[tuple[str, ModelState, bool]]


def _holding(round_: MachineRound, without: str) -> Signature:
    """Every model but ``without`` that holds memory or is in an operation: what must not change under a watch.
    A stopped model with no engine holds nothing, so its being placed here or not changes nothing."""
    return frozenset((name, seen.state, seen.engine) for name, seen in round_.models.items()
                     if name != without and (seen.engine or seen.state in TRANSITIONAL))


@dataclass(slots=True)
class _Watch:
    model: str
    node: str
    spec_hash: str
    started: float
    baseline: float
    lowest: float
    others: Signature
    ready_at: float | None

    def drop(self, now: float) -> Drop:
        return Drop(ts=now, started=self.started, model=self.model, node=self.node, baseline=self.baseline,
                    lowest=self.lowest, spec_hash=self.spec_hash)


class StartWatch:
    """Turns rounds into drops, one watch at a time per machine (see the module doc for the rules).

    ``adopted(model)`` says whether the model's latest start is an adoption (the sampler asks the waker's events).
    """

    def __init__(self, settle: float = DEFAULT_SETTLE, adopted: Callable[[str], bool] | None = None) -> None:
        self.settle = settle
        self._adopted = adopted or (lambda model: False)
        self._previous: dict[str, list[tuple[float, MachineRound]]] = {}  # each machine's last two rounds
        self._open: dict[str, _Watch] = {}

    def watching(self, machine: str) -> str | None:
        """The model whose start is watched on ``machine`` now, if any."""
        watch = self._open.get(machine)
        return watch.model if watch else None

    def observe(self, now: float, machines: Mapping[str, MachineRound]) -> list[Drop]:
        """Feed one round (unix time ``now``); returns the drops whose watch ended with it."""
        drops = []
        for key in set(self._previous) - set(machines):
            self._previous.pop(key)
            self._open.pop(key, None)
        for key, current in machines.items():
            previous = self._previous.get(key, [])
            self._previous[key] = [*previous[-1:], (now, current)]
            watch = self._open.pop(key, None)
            if watch is not None:
                kept, drop = self._follow(watch, now, current)
                if drop is not None:
                    drops.append(drop)
                if kept:
                    self._open[key] = watch
                continue  # a new watch needs a round in which nothing else was watched
            if len(previous) == 2:
                begun = self._begin(previous[0][1], previous[1], now, current)
                if begun is not None:
                    if self.settle <= 0 and begun.ready_at is not None:
                        drops.append(begun.drop(now))
                    else:
                        self._open[key] = begun
        return [d for d in drops if self._trustworthy(d)]

    def _follow(self, watch: _Watch, now: float, current: MachineRound) -> tuple[bool, Drop | None]:
        """(whether the watch goes on, the drop it ended with)."""
        seen = current.models.get(watch.model)
        state = seen.state if seen is not None else None
        undisturbed = current.available is not None and _holding(current, watch.model) == watch.others
        going = (state is S.READY or (state is S.STARTING and watch.ready_at is None))
        if undisturbed and going and current.available is not None:
            watch.lowest = min(watch.lowest, current.available)
            if state is S.READY and watch.ready_at is None:
                watch.ready_at = now
            if watch.ready_at is not None and now - watch.ready_at >= self.settle:
                return False, watch.drop(now)
            return True, None
        if watch.ready_at is not None:  # loaded and seen ready: what it lost until the last clean round stands
            return False, watch.drop(now)
        log.debug("start of %s on %s not measured: %s", watch.model, watch.node,
                  "another model's memory changed meanwhile" if state is not None else "it left the machine")
        return False, None

    def _begin(self, earlier: MachineRound, previous: tuple[float, MachineRound], now: float,
               current: MachineRound) -> _Watch | None:
        """A watch of the model that started since ``previous`` (the baseline; ``earlier`` is the round before it),
        if the rules of the module doc let one begin."""
        then, before = previous
        if before.available is None or current.available is None or earlier.available is None:
            return None
        started = [name for name, seen in current.models.items()
                   if seen.state in (S.STARTING, S.READY) and _had_no_engine(before.models.get(name))]
        if len(started) != 1:
            if len(started) > 1:
                log.debug("starts of %s overlap: none measured", ", ".join(sorted(started)))
            return None
        [model] = started
        seen = current.models[model]
        others = _holding(current, model)
        if (seen.spans or others != _holding(before, model) or any(state in TRANSITIONAL for _, state, _ in others)
                or self._adopted(model)):
            return None
        if any(seen.state in TRANSITIONAL for seen in earlier.models.values()):
            return None  # the baseline came right after an operation: what it moved may still be on its way
        if before.available - earlier.available >= STEADY_GIB:
            log.debug("start of %s not measured: MemAvailable was still rising before it (%.2f -> %.2f GiB)", model,
                      earlier.available, before.available)
            return None
        return _Watch(model=model, node=seen.node, spec_hash=seen.spec_hash, started=then, baseline=before.available,
                      lowest=current.available, others=others, ready_at=now if seen.state is S.READY else None)

    @staticmethod
    def _trustworthy(drop: Drop) -> bool:
        if drop.gib <= 0:
            log.debug("start of %s on %s: MemAvailable did not fall (%.2f -> %.2f GiB); not recorded", drop.model,
                      drop.node, drop.baseline, drop.lowest)
            return False
        return True


def _had_no_engine(seen: Seen | None) -> bool:
    return seen is None or (not seen.engine and seen.state in (S.STOPPED, S.FAILED))


def unified_machines(nodes: Mapping[str, NodeConfig]) -> dict[str, str]:
    """The machine of every node with unified memory: :data:`HERE` for local nodes, the node's name for others.
    Nodes whose memory is separate or unknown are left out (their models are sampled per process)."""
    return {name: HERE if node.is_local() else name for name, node in nodes.items() if node.unified_memory}


def machine_rounds(status: WakerStatus, machines: Mapping[str, str], here: float | None) -> dict[str, MachineRound]:
    """One round per machine of ``machines`` (node -> machine, from :func:`unified_machines`) out of the waker's
    read model; ``here`` is this machine's MemAvailable in GiB. A remote machine's is its Docker memory probe's
    reading (the node's own MemAvailable), where that is the probe; else unknown."""
    available: dict[str, float | None] = {HERE: here}
    for node in status.nodes:
        key = machines.get(node.name)
        if key is not None and key != HERE:
            available[key] = node.live_free_gb if node.probe.startswith("docker") else None
    models: dict[str, dict[str, Seen]] = {key: {} for key in set(machines.values())}
    for model in status.models:
        if not model.placed:
            continue
        seen = Seen(state=model.state, engine=model.engine is not None, node=model.placed[0],
                    spec_hash=model.spec.spec_hash(), spans=len(model.placed) > 1)
        for key in {machines[n] for n in model.placed if n in machines}:
            models[key][model.name] = seen
    return {key: MachineRound(available.get(key), seen) for key, seen in models.items()}


__all__ = ["DEFAULT_SETTLE", "HERE", "STEADY_GIB", "MachineRound", "Seen", "StartWatch", "machine_rounds",
           "unified_machines"]
