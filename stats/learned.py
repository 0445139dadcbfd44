"""Learned footprints offered to the budget: ``memory_gb: auto``, and what a sleeping engine really keeps.

A declared ``memory_gb`` is a guess; too low and two engines that "fit" OOM together (on a GB10 the whole box can
stall), too high and models wait for room they would never use. Once the sampler has watched a model load and
serve, its measured peak, with a margin, is a better figure. The same holds asleep: what an engine keeps after a
sleep depends on the engine, its version, the sleep level and (on unified memory) its host process, so once it has
been sampled asleep that peak replaces the default ``sleep_memory_gb``.
"""

from __future__ import annotations

import math

from stats.store import SampleStore

DEFAULT_MARGIN = 1.2
"""20% above the largest footprint seen: samples are seconds apart and can miss the very top of a load spike, and
longer contexts than any seen so far grow the KV cache of engines that allocate it lazily (llama.cpp)."""


def learned_memory_gb(store: SampleStore, model: str, margin: float = DEFAULT_MARGIN, *,
                      spec_hash: str | None = None, since: float | None = None) -> float | None:
    """GiB to hold for ``model``: its learned peak (load or steady, see :meth:`SampleStore.learned_peak`) times
    ``margin``, rounded up to 0.1 GiB; None until the model has been sampled while READY, when the declared
    ``memory_gb`` must be used instead.

    Pass ``spec_hash=spec.spec_hash()`` so that samples of an earlier engine configuration (other flags, another
    image) don't count: ``memory_gb`` itself is not part of that hash, so switching to ``auto`` keeps the history.
    """
    if margin < 1.0:
        raise ValueError(f"margin {margin} would hold less than the measured peak; use 1.0 or more")
    peak = store.learned_peak(model, spec_hash=spec_hash, since=since)
    if peak is None:
        return None
    return math.ceil(round(peak * margin * 10, 6)) / 10


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
    asleep = [s.footprint for s in store.samples(model, since=since, spec_hash=spec_hash) if s.phase == "sleep"]
    peak = max((value for value in asleep if value is not None), default=None)
    if peak is None:
        return None
    return math.ceil(round(peak * margin * 10, 6)) / 10
