"""What each engine is told about memory, so that it takes what the budget counts for it and no more.

The budget counts ``memory_gb`` for a model, but an engine left to itself takes what its own default gives it:
vLLM 0.9 of the GPU's total memory, TensorRT-LLM 0.9 of the memory free after its weights, SGLang a share picked
from the GPU's size. On unified memory (a DGX Spark's 128 GB) that is the whole box, and a second engine the
budget admitted beside it then runs out of memory. So when the entry gives no ``gpu_memory_utilization`` and a
``memory_gb``, the fraction is derived from ``memory_gb`` and the node's total, in the engine's own terms:

* vLLM (``--gpu-memory-utilization``): a share of the total memory, so ``memory_gb / total_gb``;
* SGLang (``--mem-fraction-static``): a share of the memory FREE WHEN IT LAUNCHES (sglang model_runner: the KV
  pool is ``fraction x free_at_launch - weights``), so ``memory_gb / total_gb`` is exact only on an empty node:
  beside other models it gets less, and may refuse to start ("Not enough memory"). No static fraction is right in
  both cases unless ``--max-total-tokens`` caps the pool: then a generous fraction is safe and the cap decides
  what it holds. A derived SGLang fraction therefore comes with a warning that says so, and an SGLang entry whose
  args carry ``--max-total-tokens`` is not warned about its fraction (``sparkgate check`` estimates it instead);
* TensorRT-LLM (``--kv_cache_free_gpu_memory_fraction``): a share of the memory still free *after* the weights
  are loaded, given to the KV cache, so ``(memory_gb - W) / (total_gb - W)`` with ``W`` the weights' size when
  the model is a local path the gateway can read (``W = 0`` otherwise, with a warning: the engine may then take
  up to the weights' size more than ``memory_gb``).

A model that may run on nodes of different totals gets the fraction of the largest, which gives it at most
``memory_gb`` on every one of them. Fractions are rounded down to 0.01 and kept within [0.01, 0.95].
``memory_gb: auto`` gets none: the learned footprint would be measured under the fraction derived from it, and
grow by the margin at every load. A fraction the entry gives is kept, and a warning names both figures when it
disagrees with ``memory_gb`` by more than 10 %.

Pure: the nodes' totals come in as numbers and the weights' size through a reader (:func:`weights_gb` reads the
files), so gateway/config.py applies it at load and tests need no model on disk.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from waker.config.args import has_flag
from waker.config.checkpoint import read_checkpoint
from waker.config.spec import EngineKind, IdleAction, ModelSpec

FRACTION_OF = {EngineKind.VLLM: "total", EngineKind.SGLANG: "free at launch",
               EngineKind.TRTLLM: "free after the weights"}
"""The engines with a memory fraction, and what it is a share of."""

MIN_FRACTION = 0.01
MAX_FRACTION = 0.95  # room for the process itself, the CUDA context and the OS, whatever memory_gb says
DISAGREEMENT = 0.10
SGLANG_POOL_CAP = ("--max-total-tokens",)
"""The SGLang flag that caps its KV pool at a number of tokens, whatever its fraction of the free memory gives."""

WeightsReader = Callable[[ModelSpec], float | None]
"""The size of a model's weights in GiB, or None when they can't be read from here."""

_GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Fit:
    """A model's entry after the fraction rule, and what ``sparkgate check`` and the load log say about it."""

    spec: ModelSpec
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def fit_fraction(spec: ModelSpec, totals: Sequence[float], weights: WeightsReader) -> Fit:
    """`spec` with its fraction derived (see the module doc), or as it is with a warning where a given fraction and
    ``memory_gb`` disagree. `totals`: the total memory (GiB) of each node the model may run on."""
    kind = FRACTION_OF.get(spec.engine)
    if kind is None or not spec.manages_lifecycle or not totals:
        return Fit(spec)
    total = max(totals)
    memory = spec.memory_gb
    if spec.gpu_memory_utilization is not None:
        return Fit(spec, warnings=_disagreement(spec, total, weights))
    if spec.memory_auto:
        return Fit(spec, warnings=(
            f"no gpu_memory_utilization derived from memory_gb auto (the learned footprint would feed on its own "
            f"fraction): {spec.engine} takes its default share of {_gb(total)} GB; set gpu_memory_utilization",))
    if memory <= 0:
        return Fit(spec, warnings=(
            f"neither memory_gb nor gpu_memory_utilization: {spec.engine} takes its default share of "
            f"{_gb(total)} GB while the budget counts 0 GB for it",))
    warnings: list[str] = []
    if spec.engine is EngineKind.TRTLLM:
        size = weights(spec)
        if size is None:
            size = 0.0
            warnings.append(f"the weights' size is unknown ({spec.model!r} is not a path readable here): the "
                            f"fraction counts none, so trtllm may take up to that much more than memory_gb "
                            f"{_gb(memory)}")
        elif memory <= size:
            warnings.append(f"memory_gb {_gb(memory)} doesn't cover the weights' {_gb(size)} GB: the KV cache gets "
                            f"the least fraction, {MIN_FRACTION}")
        fraction = (memory - size) / (total - size) if total > size else 0.0
        how = (f"derived from memory_gb {_gb(memory)} less the weights' {_gb(size)} GB, of the {_gb(total - size)} GB "
               f"of {_gb(total)} GB free after them" if size else
               f"derived from memory_gb {_gb(memory)} of {_gb(total)} GB, counting no weights")
    else:
        fraction = memory / total
        how = f"derived from memory_gb {_gb(memory)} of {_gb(total)} GB"
        if spec.engine is EngineKind.SGLANG and not has_flag(spec.args, SGLANG_POOL_CAP):
            warnings.append(f"sglang's --mem-fraction-static is a share of the memory free when it launches: the "
                            f"derived {_bounded(fraction):.2f} gives it memory_gb {_gb(memory)} only on an empty "
                            f"node, less (or 'Not enough memory') beside other models. Cap the KV pool with "
                            f"--max-total-tokens in args and set a fraction for the fullest node (see sparkgate check)")
    fraction = _bounded(fraction)
    derived = spec.model_copy(update={"gpu_memory_utilization": fraction, "memory_fraction_derived": True})
    return Fit(derived, notes=(f"gpu_memory_utilization {fraction:.2f} ({how})",), warnings=tuple(warnings))


def _disagreement(spec: ModelSpec, total: float, weights: WeightsReader) -> tuple[str, ...]:
    fraction, memory = spec.gpu_memory_utilization, spec.memory_gb
    if fraction is None or memory <= 0 or spec.memory_auto:
        return ()
    if spec.engine is EngineKind.SGLANG and has_flag(spec.args, SGLANG_POOL_CAP):
        return ()  # the cap, not the fraction, decides what it holds: sparkgate check estimates that
    if spec.engine is EngineKind.TRTLLM:
        size = weights(spec)
        if size is None:
            return ()  # what it takes depends on the weights: sparkgate check says so once they are on disk
        takes = size + fraction * max(total - size, 0.0)
        how = f"the weights' {_gb(size)} GB + {fraction:g} of the {_gb(total - size)} GB free after them"
    else:
        takes = fraction * total
        how = f"{fraction:g} of {_gb(total)} GB"
    if abs(takes - memory) <= DISAGREEMENT * memory:
        return ()
    side = ("more than the budget counts for it" if takes > memory
            else "less than the budget holds for it")
    return (f"gpu_memory_utilization {fraction:g} gives {spec.engine} about {_gb(takes)} GB ({how}) but memory_gb is "
            f"{_gb(memory)}: {side}",)


def _bounded(fraction: float) -> float:
    """Rounded down to 0.01 (the epsilon keeps 0.3 from becoming 0.29), within [MIN_FRACTION, MAX_FRACTION]."""
    return min(MAX_FRACTION, max(MIN_FRACTION, math.floor(fraction * 100 + 1e-9) / 100))


def sleep_level_problem(spec: ModelSpec, unified_on: Sequence[str]) -> str | None:
    """Why `spec` can't be loaded as it stands, or None: vLLM's sleep level 1 where memory is unified.

    Level 1 moves the weights to CPU RAM: on unified memory the same pool, so the sleep frees almost nothing, and
    waking from it can hang a GB10 host (vLLM issue #50011; the fix, PR #57629, is not merged). `unified_on`: the
    nodes with unified memory the model may run on (for the process runtime: this machine's node).
    """
    if (spec.engine is not EngineKind.VLLM or spec.idle_action is not IdleAction.SLEEP or spec.sleep_level != 1
            or spec.sleep_level_1_on_unified_memory or not spec.manages_lifecycle or not unified_on):
        return None
    where = str(spec.source) if spec.source else spec.name
    nodes = ", ".join(repr(n) for n in unified_on)
    return (f"{where}: sleep_level: 1 is refused for vllm on unified memory (node {nodes}): level 1 moves the "
            "weights to CPU RAM, the same memory there, so the sleep frees almost nothing, and its wake can hang the "
            "host (vLLM #50011, fix not merged). Use sleep_level: 2, or set sleep_level_1_on_unified_memory: true "
            "to take the risk")


def weights_gb(spec: ModelSpec) -> float | None:
    """The size of `spec`'s weights as this machine sees them (waker/config/checkpoint.py finds them: a path, through
    a Docker entry's volume, or a hub id in the Hugging Face cache; copies under ``original/`` are not counted). None
    when they can't be read from here or are not all downloaded."""
    found = read_checkpoint(spec)
    return found.weights_bytes / _GIB if found.weights_bytes else None


def _gb(value: float) -> str:
    """12, 23.4: GiB figures as people write them."""
    return f"{value:.1f}".removesuffix(".0")


__all__ = ["DISAGREEMENT", "FRACTION_OF", "MAX_FRACTION", "MIN_FRACTION", "Fit", "WeightsReader", "fit_fraction",
           "sleep_level_problem", "weights_gb"]
