"""Learned footprints offered to the budget: ``memory_gb: auto``, and what a sleeping engine really keeps.

A declared ``memory_gb`` is a guess; too low and two engines that "fit" OOM together (on a GB10 the whole box can
stall), too high and models wait for room they would never use. Once the sampler has watched a model load and
serve, its measured peak, with a margin, is a better figure. The same holds asleep: what an engine keeps after a
sleep depends on the engine, its version, the sleep level and (on unified memory) its host process, so once it has
been sampled asleep that peak replaces the default ``sleep_memory_gb``.

Which measurement counts depends on the memory:

* separate (discrete GPUs) or unknown: the largest per-engine footprint (cgroup or PSS, plus NVML's per-process
  device memory), once the model has been sampled READY (:meth:`SampleStore.learned_peak`);
* unified (GB10): per-engine figures miss every CUDA allocation, so only what the machine lost over a start that ran
  alone counts (:class:`~stats.store.Drop`, stats/unified.py); with no such drop there is nothing trustworthy to
  learn from and :func:`learn_memory` answers None, whatever the per-engine samples say.

The learned figure is capped at the largest node the model may run on (``ceiling``): a peak of 101 GB x 1.2 would
otherwise be refused at load by a 120 GB budget, although the model ran there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stats.store import SampleStore

DEFAULT_MARGIN = 1.2
"""20% above the largest footprint seen: samples are seconds apart and can miss the very top of a load spike, and
longer contexts than any seen so far grow the KV cache of engines that allocate it lazily (llama.cpp)."""


@dataclass(frozen=True, slots=True)
class LearnedMemory:
    """What ``memory_gb: auto`` becomes: ``gb`` to hold, from the measured ``peak`` x margin (``wanted``), capped at
    the ceiling; ``source`` says which measurement it is."""

    gb: float
    peak: float
    wanted: float
    source: str

    @property
    def capped(self) -> bool:
        return self.gb < self.wanted


def learn_memory(store: SampleStore, model: str, *, unified: bool, margin: float = DEFAULT_MARGIN,
                 spec_hash: str | None = None, ceiling: float | None = None,
                 since: float | None = None) -> LearnedMemory | None:
    """``model``'s learned memory (see the module doc), or None while there is no trustworthy measurement.

    ``unified``: the model may run on a unified-memory node; then a drop is required, and the larger of the drop
    and a per-engine peak (from a node with separate memory, where that one is right) is taken. ``ceiling``: the
    largest capacity among the nodes it may run on, in GiB.
    """
    if margin < 1.0:
        raise ValueError(f"margin {margin} would hold less than the measured peak; use 1.0 or more")
    sampled = store.learned_peak(model, spec_hash=spec_hash, since=since)
    if unified:
        drop = store.learned_drop(model, spec_hash=spec_hash, since=since)
        if drop is None:
            return None
        peak = max(drop, sampled or 0.0)
        source = "the largest drop of MemAvailable over a start alone on unified memory"
    elif sampled is None:
        return None
    else:
        peak, source = sampled, "the largest footprint sampled while loading or ready"
    wanted = _round_up(peak * margin)
    gb = wanted if ceiling is None else min(wanted, math.floor(ceiling * 10 + 1e-9) / 10)
    return LearnedMemory(gb=gb, peak=peak, wanted=wanted, source=source)


def learned_memory_gb(store: SampleStore, model: str, margin: float = DEFAULT_MARGIN, *,
                      spec_hash: str | None = None, since: float | None = None) -> float | None:
    """GiB to hold for ``model`` where memory is separate: its learned peak (load or steady, see
    :meth:`SampleStore.learned_peak`) times ``margin``, rounded up to 0.1 GiB; None until the model has been sampled
    while READY, when the declared ``memory_gb`` must be used instead.

    Pass ``spec_hash=spec.spec_hash()`` so that samples of an earlier engine configuration (other flags, another
    image) don't count: ``memory_gb`` itself is not part of that hash, so switching to ``auto`` keeps the history.
    """
    if margin < 1.0:
        raise ValueError(f"margin {margin} would hold less than the measured peak; use 1.0 or more")
    peak = store.learned_peak(model, spec_hash=spec_hash, since=since)
    return None if peak is None else _round_up(peak * margin)


def learned_sleep_gb(store: SampleStore, model: str, margin: float = DEFAULT_MARGIN, *,
                     spec_hash: str | None = None, since: float | None = None) -> float | None:
    """GiB a sleeping ``model`` holds: the largest footprint sampled while it was SLEEPING (phase "sleep"), times
    ``margin``, rounded up to 0.1 GiB; None until it has been sampled asleep.

    Filtered by ``spec_hash`` like :func:`learned_memory_gb` (another configuration, another sleep level or image,
    keeps something else). The caller caps it at ``memory_gb``: a sleeping engine never holds more than an awake one
    is budgeted for.
    """
    if margin < 1.0:
        raise ValueError(f"margin {margin} would hold less than the measured peak; use 1.0 or more")
    peak = store.learned_sleep_peak(model, spec_hash=spec_hash, since=since)
    return None if peak is None else _round_up(peak * margin)


def _round_up(gib: float) -> float:
    """Up to the next 0.1 GiB, never below (the round() first keeps 12.0000001 from becoming 12.1)."""
    return math.ceil(round(gib * 10, 6)) / 10


__all__ = ["DEFAULT_MARGIN", "LearnedMemory", "learn_memory", "learned_memory_gb", "learned_sleep_gb"]
