"""Know before you wait: whether each engine will start with the memory its flag gives it, from what is on disk.

A 61 GiB model that needs 20 minutes to load and then refuses to start for want of 2 GiB of KV cache costs an
evening. ``sparkgate check`` (and the gateway at every load) does the engine's arithmetic first, for each vLLM,
SGLang, TensorRT-LLM and llama.cpp entry whose weights are on disk (waker/config/checkpoint.py reads them):

    needs = weights (the checkpoint files' size) + KV for one request of the context the args ask for
            + the engine's overhead (activations, CUDA graphs, CUDA context; :data:`OVERHEAD_GB`, estimates)

and compares it with what the entry's memory flag gives that engine, in the engine's own terms (the research file
``dgx-spark-catalog.md`` and each engine's source):

* vLLM ``--gpu-memory-utilization f``: the engine takes ``f x the CUDA total`` for weights, activations and KV
  cache together, and refuses to start when the KV cache left can't hold one request of ``--max-model-len``
  ("To serve at least one request with the models's max seq len ... larger than the available KV cache memory").
  It also refuses when less than ``f x total`` is free at launch ("Free memory on device ... is less than desired
  GPU memory utilization").
* SGLang ``--mem-fraction-static f``: a share of the memory FREE WHEN IT LAUNCHES for weights and the KV pool
  (sglang model_runner ``profile_max_num_token``: pool = ``f x free_at_launch - weights``); activations and CUDA
  graphs live in the rest. A pool of nothing stops it ("Not enough memory. Please try to increase
  --mem-fraction-static"); a pool smaller than one request of ``--context-length`` starts, but refuses longer
  requests. ``--max-total-tokens N`` caps the pool at N tokens.
* TensorRT-LLM ``--kv_cache_free_gpu_memory_fraction f``: the KV cache gets ``f x`` the memory free after the weights
  and buffers are loaded (tensorrt_llm/commands/serve.py); a cache smaller than one ``--max_seq_len`` request
  shortens what it serves.
* llama.cpp: no fraction; it allocates the weights and the KV for ``-c/--ctx-size`` tokens (all ``--parallel``
  slots together) at start, K and V in ``-ctk``/``-ctv`` (f16 by default), and fails when that isn't free.

The CUDA total is not the node's total: a GB10 shows 121.69 GiB to the OS (MemTotal) and 119.56 GiB to CUDA
(vLLM's "55.87/119.56 GiB", vllm#48140; Ray's "115.65GB / 121.69GB", vllm#50011), so on unified memory it is taken
as ``total - UNIFIED_CUDA_GAP_GB`` (2.1 GiB), unless the node sets ``cuda_total_gb``; on discrete GPUs the node's
total is the GPUs' total already. When the context isn't in the args, the model's own maximum
(``max_position_embeddings``, or the GGUF's ``context_length``) is what the engine takes, and what is checked.

Each model is checked in scenarios: alone on each node it may run on (free at launch = the CUDA total), and in the
groups ``sparkgate check --together`` names, each member started last (free at launch = the CUDA total less the
others' ``memory_gb``). The verdicts: FITS; WILL NOT START (the engine refuses; the reason in numbers); CONTEXT CUT
(it starts, but the longest request it takes is shorter than the context asked for); OVER BUDGET (it starts, but
takes more than its ``memory_gb``, so the budget promises others memory it holds); CAN'T TELL (weights not
downloaded, ``memory_gb: auto``, a checkpoint it can't read). External and generic engines are not checked.

Pure: the checkpoints come through a reader and the nodes as data, so tests need neither GPU nor weights.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from waker.config.args import flag_value
from waker.config.checkpoint import Checkpoint, CheckpointReader, KvShape
from waker.config.nodes import NodeConfig
from waker.config.spec import EngineKind, ModelSpec

OVERHEAD_GB = {EngineKind.VLLM: 2.0, EngineKind.SGLANG: 2.0, EngineKind.TRTLLM: 2.0, EngineKind.LLAMACPP: 0.5}
"""What an engine holds beyond weights and KV cache: activations, CUDA graphs, the CUDA context, workspaces.
Estimates (vLLM measures ~1-2 GiB of activation peak and CUDA graphs for models of this size; llama.cpp's compute
buffers are a few hundred MiB), not measurements of a given model: close calls deserve a margin."""

UNIFIED_CUDA_GAP_GB = 2.1
"""MemTotal less the CUDA total on unified memory: 121.69 - 119.56 GiB measured on a GB10 (see the module doc)."""

DEFAULT_FRACTION = {EngineKind.VLLM: 0.9, EngineKind.TRTLLM: 0.9}
"""The engines' own defaults when neither the entry nor its args give a fraction (SGLang picks one from the GPU's
size: can't tell)."""

MEMORY_FLAGS = {
    EngineKind.VLLM: ("--gpu-memory-utilization", "--gpu_memory_utilization"),
    EngineKind.SGLANG: ("--mem-fraction-static",),
    EngineKind.TRTLLM: ("--kv_cache_free_gpu_memory_fraction", "--free_gpu_memory_fraction"),
}
"""The memory flags as the adapters spell them (waker/engines/*.py): a value in the entry's args wins over
``gpu_memory_utilization``, as it does on the command line."""

CONTEXT_FLAGS = {
    EngineKind.VLLM: ("--max-model-len", "--max_model_len"),
    EngineKind.SGLANG: ("--context-length",),
    EngineKind.TRTLLM: ("--max_seq_len", "--max-seq-len"),
    EngineKind.LLAMACPP: ("--ctx-size", "-c"),
}
"""The flag that sets the context (one request's length; llama.cpp's is shared by its --parallel slots)."""

_KV_DTYPE_FLAGS = {EngineKind.VLLM: ("--kv-cache-dtype", "--kv_cache_dtype"), EngineKind.SGLANG: ("--kv-cache-dtype",)}
_POOL_CAP = ("--max-total-tokens",)
_SLOTS = ("--parallel", "-np")
_LLAMACPP_CACHE_TYPES = (("--cache-type-k", "-ctk"), ("--cache-type-v", "-ctv"))
_LLAMACPP_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                   "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
"""llama.cpp's cache types: bytes per element (a q8_0 block is 32 values in 34 bytes)."""

_GIB = 1024**3
_TIMES = " \N{MULTIPLICATION SIGN} "  # as the issue and the docs write the engines' arithmetic
_SLACK_GB = 0.05  # figures are shown to 0.1 GiB: a budget met to within that is met


class Verdict(StrEnum):
    FITS = "FITS"
    OVER_BUDGET = "OVER BUDGET"
    CONTEXT_CUT = "CONTEXT CUT"
    WILL_NOT_START = "WILL NOT START"
    CANT_TELL = "CAN'T TELL"


@dataclass(frozen=True, slots=True)
class Estimate:
    """One model in one scenario: the figures (GiB) and the verdict with its reasons, each a sentence in numbers."""

    model: str
    engine: str
    verdict: Verdict
    reasons: tuple[str, ...] = ()
    weights_gb: float | None = None
    kv_gb: float | None = None
    kv_tokens: str = ""
    overhead_gb: float | None = None
    needs_gb: float | None = None
    gives_gb: float | None = None
    memory_gb: float = 0.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """The models of one node checked under one assumption about what else runs there."""

    title: str
    node: str
    estimates: tuple[Estimate, ...]
    problems: tuple[str, ...] = ()
    """What is wrong with the scenario itself (a group whose memory_gb exceed the budget)."""

    @property
    def fails(self) -> bool:
        """Whether a model in it will not start, or the group itself can't be."""
        return bool(self.problems) or any(e.verdict is Verdict.WILL_NOT_START for e in self.estimates)


@dataclass(frozen=True)
class FitReport:
    """Every scenario checked, and the checkpoints read for them (so later scenarios read nothing again)."""

    scenarios: tuple[Scenario, ...] = ()
    checkpoints: Mapping[str, Checkpoint] = field(default_factory=dict)

    @property
    def fails(self) -> bool:
        return any(s.fails for s in self.scenarios)

    def warnings(self) -> dict[str, list[str]]:
        """Per model, what the load should warn about: every verdict other than FITS and CAN'T TELL, with its
        scenario (the gateway serves anyway: the weights may still change)."""
        said: dict[str, list[str]] = {}
        for scenario in self.scenarios:
            for e in scenario.estimates:
                if e.verdict not in (Verdict.FITS, Verdict.CANT_TELL):
                    said.setdefault(e.model, []).extend(
                        f"{e.verdict.lower()} ({scenario.title}): {reason}" for reason in e.reasons)
        return said


def checked(spec: ModelSpec) -> bool:
    """Whether the fit check applies: an engine with a memory rule that the gateway launches."""
    return spec.engine in OVERHEAD_GB and spec.manages_lifecycle


def cuda_total_gb(node: NodeConfig) -> float:
    """What CUDA reports as the total on `node` (see the module doc): ``cuda_total_gb`` if set; on unified memory the
    node's total less :data:`UNIFIED_CUDA_GAP_GB`; else the node's total."""
    if node.cuda_total_gb is not None:
        return node.cuda_total_gb
    total = node.total_gb or 0.0
    return max(total - UNIFIED_CUDA_GAP_GB, 0.0) if node.unified_memory else total


def alone(specs: Iterable[ModelSpec], nodes: Mapping[str, NodeConfig], places: Mapping[str, Sequence[str]],
          read: CheckpointReader, checkpoints: Mapping[str, Checkpoint] | None = None) -> FitReport:
    """Each checked model alone on each node it may run on (`places`: model -> node names): one scenario per node.
    Checkpoints are read once per model (`checkpoints`: ones read before)."""
    specs = [s for s in specs if checked(s)]
    read_now = dict(checkpoints or {})
    for spec in specs:
        if spec.name not in read_now:
            read_now[spec.name] = read(spec)
    scenarios = []
    for name, node in nodes.items():
        here = [s for s in specs if name in places.get(s.name, ())]
        if not here:
            continue
        total = cuda_total_gb(node)
        title = f"alone on node {name!r}: {_gb(node.total_gb or 0.0)} GiB, CUDA total {_gb(total)} GiB"
        scenarios.append(Scenario(title, name, tuple(
            _on(name, node, estimate(s, read_now[s.name], cuda_total=total)) for s in here)))
    return FitReport(tuple(scenarios), read_now)


def together(group: Sequence[ModelSpec], node_name: str, node: NodeConfig, report: FitReport,
             read: CheckpointReader) -> FitReport:
    """`report` with one more scenario: `group` on `node`, each member started last beside the others (their
    memory_gb taken). A group whose memory_gb exceed the node's budget is a problem of the scenario: the scheduler
    never runs it that way."""
    read_now = dict(report.checkpoints)
    for spec in group:
        if checked(spec) and spec.name not in read_now:
            read_now[spec.name] = read(spec)
    total = cuda_total_gb(node)
    held = sum(s.memory_gb for s in group)
    budget = max((node.total_gb or 0.0) - node.reserve_gb, 0.0)
    problems = []
    if held > budget + _SLACK_GB:
        problems.append(f"memory_gb {_gb(held)} > the node's budget {_gb(budget)} GiB "
                        f"({_gb(node.total_gb or 0.0)} - reserve {_gb(node.reserve_gb)}): the scheduler never runs "
                        "them together")
    title = (f"together on node {node_name!r}: {', '.join(s.name for s in group)} "
             f"(memory_gb {_gb(held)} of a {_gb(budget)} GiB budget), each started last")
    estimates = tuple(_on(node_name, node, estimate(s, read_now[s.name], cuda_total=total,
                                                    others=[o for o in group if o is not s]))
                      for s in group if checked(s))
    scenario = Scenario(title, node_name, estimates, tuple(problems))
    return FitReport((*report.scenarios, scenario), read_now)


def _on(name: str, node: NodeConfig, result: Estimate) -> Estimate:
    """`result` on `node`: what couldn't be told on a remote node may be there (its disk is not read from here)."""
    if result.verdict is not Verdict.CANT_TELL or node.is_local():
        return result
    return replace(result, reasons=tuple(f"{r} (on this machine: node {name!r} is a remote Docker host, its disk is "
                                         "not read)" for r in result.reasons))


def estimate(spec: ModelSpec, checkpoint: Checkpoint, *, cuda_total: float,
             others: Sequence[ModelSpec] = ()) -> Estimate:
    """`spec` started with `others` already holding their memory_gb (see the module doc)."""
    engine = spec.engine
    base = Estimate(spec.name, engine.value, Verdict.CANT_TELL, memory_gb=spec.memory_gb)
    why = _cant_tell(spec, checkpoint)
    if why is not None:
        return replace(base, reasons=(why,))
    assert checkpoint.weights_bytes is not None and checkpoint.kv is not None
    kv = checkpoint.kv
    context, from_where = _context(spec, kv)
    if context is None:
        return replace(base, reasons=(from_where,))
    key_bytes, value_bytes = _kv_element_bytes(spec, kv)
    weights = checkpoint.weights_bytes / _GIB
    overhead = OVERHEAD_GB[engine]
    free = cuda_total - sum(o.memory_gb for o in others)
    beside = (f"beside {', '.join(o.name for o in others)}: {_gb(cuda_total)} - {_gb(sum(o.memory_gb for o in others))}"
              if others else "")
    if engine is EngineKind.LLAMACPP:
        slots = _positive_int(flag_value(spec.args, _SLOTS)) or 1
        kv_gb = kv.kv_bytes(context, key_bytes, value_bytes) / _GIB
        tokens = f"{context}, {slots} slots" if slots > 1 else str(context)
        request = f"{context} tokens ({slots} slots of {context // slots})" if slots > 1 else f"{context} tokens"
    else:
        kv_gb = kv.kv_bytes(context, key_bytes, value_bytes) / _GIB
        tokens, request = str(context), f"one {context}-token request"
    if from_where != CONTEXT_FLAGS[engine][0]:
        request += f" ({from_where}: no {CONTEXT_FLAGS[engine][0]} in args)"
    needs = weights + kv_gb + overhead
    figures = replace(base, weights_gb=weights, kv_gb=kv_gb, kv_tokens=tokens, overhead_gb=overhead, needs_gb=needs)
    sum_text = f"weights {weights:.1f} GiB + KV for {request} {kv_gb:.1f} GiB + overhead {_gb(overhead)} GiB"
    fails: list[str] = []
    cuts: list[str] = []
    if engine is EngineKind.VLLM:
        fraction = _fraction(spec)
        gives = fraction * cuda_total
        how = f"{fraction:g}{_TIMES}{cuda_total:.1f} GiB"
        if needs > gives:
            fails.append(f"{sum_text} > {how} = {gives:.1f} GiB")
        if others and gives > free:
            fails.append(f"vLLM wants {how} = {gives:.1f} GiB free at launch; {beside} = {free:.1f} GiB is free")
    elif engine is EngineKind.SGLANG:
        fraction = _fraction(spec)
        static = fraction * free
        where = f"{fraction:g}{_TIMES}{free:.1f} GiB free at launch" + (f" ({beside})" if others else "")
        pool = static - weights
        per_token = kv_gb / context
        if pool <= 0:
            fails.append(f"weights {weights:.1f} GiB > {where} = {static:.1f} GiB: no room for the KV pool "
                         "(SGLang: 'Not enough memory')")
            pool = 0.0
        cap = _positive_int(flag_value(spec.args, _POOL_CAP))
        capped = cap is not None and cap * per_token < pool
        if capped:
            pool = cap * per_token
        gives = weights + pool + overhead
        how = f"weights {weights:.1f} + KV pool {pool:.1f} + overhead {_gb(overhead)} GiB"
        if pool > 0 and kv_gb > pool + 1e-9:
            held = int(pool / per_token)
            cause = (f"--max-total-tokens {cap} caps the KV pool below {request}" if capped
                     else f"weights {weights:.1f} GiB + KV for {request} {kv_gb:.1f} GiB > {where} = {static:.1f} GiB")
            cuts.append(f"{cause}: the KV pool holds {cap if capped else held} tokens, so longer requests are "
                        "refused")
        if pool > 0 and weights + pool + overhead > free + 1e-9:
            fails.append(f"weights {weights:.1f} GiB + KV pool {pool:.1f} GiB + overhead {_gb(overhead)} GiB > "
                         f"{free:.1f} GiB free at launch" + (f" ({beside})" if others else ""))
    elif engine is EngineKind.TRTLLM:
        fraction = _fraction(spec)
        after = free - weights - overhead
        if after <= 0:
            fails.append(f"weights {weights:.1f} GiB + overhead {_gb(overhead)} GiB > {free:.1f} GiB free at launch"
                         + (f" ({beside})" if others else ""))
            after = 0.0
        pool = fraction * after
        gives = weights + overhead + pool
        how = f"weights {weights:.1f} + overhead {_gb(overhead)} + {fraction:g}{_TIMES}{after:.1f} GiB free after them"
        if after > 0 and kv_gb > pool + 1e-9:
            held = int(pool / (kv_gb / context))
            cuts.append(f"KV for {request} {kv_gb:.1f} GiB > {fraction:g}{_TIMES}{after:.1f} GiB free after the "
                        f"weights and overhead = {pool:.1f} GiB: the longest request it holds is {held} tokens")
    else:  # llama.cpp: what -c asks for, all of it at start
        gives = needs
        how = sum_text
        if needs > free:
            fails.append(f"{sum_text} > {free:.1f} GiB free at launch" + (f" ({beside})" if others else ""))
    warnings: list[str] = []
    if spec.memory_gb > 0 and not fails and gives > spec.memory_gb + _SLACK_GB:
        warnings.append(f"gives {gives:.1f} GiB ({how}) but memory_gb is {_gb(spec.memory_gb)}: the budget "
                        "undercounts it")
    verdict = (Verdict.WILL_NOT_START if fails else Verdict.CONTEXT_CUT if cuts
               else Verdict.OVER_BUDGET if warnings else Verdict.FITS)
    return replace(figures, verdict=verdict, reasons=(*fails, *cuts, *warnings), gives_gb=gives)


def _cant_tell(spec: ModelSpec, checkpoint: Checkpoint) -> str | None:
    if spec.memory_auto:
        return "memory_gb auto: the engine's share follows the learned footprint, not a fraction to check"
    if spec.nodes > 1:
        return f"spans {spec.nodes} nodes: not estimated"
    if spec.engine is EngineKind.SGLANG and _fraction_or_none(spec) is None:
        return "no --mem-fraction-static: SGLang picks one from the GPU's size"
    if checkpoint.problem is not None:
        return checkpoint.problem
    if checkpoint.weights_bytes is None or checkpoint.kv is None:
        return "the checkpoint says nothing of its size"
    return None


def _fraction_or_none(spec: ModelSpec) -> float | None:
    given = flag_value(spec.args, MEMORY_FLAGS.get(spec.engine, ()))
    if given is not None:
        try:
            return float(given)
        except ValueError:
            return None
    if spec.gpu_memory_utilization is not None:
        return spec.gpu_memory_utilization
    return DEFAULT_FRACTION.get(spec.engine)


def _fraction(spec: ModelSpec) -> float:
    fraction = _fraction_or_none(spec)
    assert fraction is not None  # SGLang without one is a CAN'T TELL before this
    return fraction


def _context(spec: ModelSpec, kv: KvShape) -> tuple[int | None, str]:
    """The context the engine will serve, and where it comes from; None and why when it can't be told."""
    names = CONTEXT_FLAGS[spec.engine]
    given = flag_value(spec.args, names)
    if given is not None:
        tokens = _tokens(given)
        if tokens is None:
            return None, f"{names[0]} {given}: not a number of tokens this check reads"
        if tokens > 0:
            return tokens, names[0]
    if kv.max_context:
        return kv.max_context, f"the model's maximum in {kv.source}"
    return None, f"no {names[0]} and the checkpoint gives no maximum context"


def _tokens(text: str) -> int | None:
    """A context length as engines take it: 131072, or vLLM's 128k / 128K / 1m (k = 1000, K = 1024)."""
    units = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        return None


def _positive_int(text: str | None) -> int | None:
    value = _tokens(text) if text is not None else None
    return value if value is not None and value > 0 else None


def _kv_element_bytes(spec: ModelSpec, kv: KvShape) -> tuple[float, float]:
    """Bytes per K and per V element: the engine's KV dtype flag, else the checkpoint's dtype ("auto")."""
    if spec.engine is EngineKind.LLAMACPP:
        k, v = (flag_value(spec.args, names) or "f16" for names in _LLAMACPP_CACHE_TYPES)
        return _LLAMACPP_BYTES.get(k.lower(), 2.0), _LLAMACPP_BYTES.get(v.lower(), 2.0)
    given = (flag_value(spec.args, _KV_DTYPE_FLAGS.get(spec.engine, ())) or "auto").lower()
    if given.startswith("fp8"):
        return 1.0, 1.0
    if given.startswith("fp4"):
        return 0.5, 0.5
    if given in ("auto", "") and (flag_value(spec.args, ("--dtype",)) or "").lower() in ("float32", "float"):
        return 4.0, 4.0
    if given in ("auto", ""):
        return kv.dtype_bytes, kv.dtype_bytes
    return 2.0, 2.0


def _gb(value: float) -> str:
    """12, 23.4: GiB figures as people write them."""
    return f"{value:.1f}".removesuffix(".0")


__all__ = ["CONTEXT_FLAGS", "DEFAULT_FRACTION", "MEMORY_FLAGS", "OVERHEAD_GB", "UNIFIED_CUDA_GAP_GB", "Estimate",
           "FitReport", "Scenario", "Verdict", "alone", "checked", "cuda_total_gb", "estimate", "together"]
