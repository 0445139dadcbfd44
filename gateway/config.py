"""Loading models.d as the gateway uses it: validated, then fitted to the nodes it runs on and to what the stats
sampler learned.

At load (startup, `sparkgate check`, every reload), with the nodes' memory known (waker/config/machine.py):

* `memory_gb: auto` becomes the learned peak x margin, capped at the largest node it may run on (with a warning);
  where that node has unified memory only a start measured by the machine's loss counts (stats/learned.py); an
  entry with nothing trustworthy learned is an error;
* vLLM's `sleep_level: 1` where memory is unified is refused, unless the entry opts in;
* vLLM, SGLang and TensorRT-LLM entries without `gpu_memory_utilization` get one derived from `memory_gb` and the
  node's total (waker/config/engine_memory.py), so the engine takes what the budget counts and not the whole box;
* a sleeping model without `sleep_memory_gb` gets its learned sleep peak x margin once it has been sampled asleep;
* each vLLM, SGLang, TensorRT-LLM and llama.cpp model whose weights are on disk is checked alone on each node it
  may run on (waker/config/fit_check.py): one that will not start, or would take more than its `memory_gb`, is a
  warning, not a refusal (the weights may change before it starts);
* explicit ports that would meet are refused: two engines on one port of one machine (a container on a local node
  meets the process engines), or an engine on the gateway's own port where the caller passes it (`gateway`:
  `sparkgate serve` and `check` do) (waker/config/registry.py `port_problems`).

`sparkgate check` shows what was derived or learned and the warnings; a running gateway logs the warnings.
"""

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from stats.learned import LearnedMemory, learn_memory, learned_sleep_gb
from stats.store import SampleStore, StoreUnavailable
from waker import compose
from waker.config.checkpoint import CheckpointReader, read_checkpoint
from waker.config.engine_memory import WeightsReader, fit_fraction, sleep_level_problem, weights_gb
from waker.config.fit_check import FitReport, alone
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError, Registry, load_dir, port_problems
from waker.config.spec import EngineKind, IdleAction, ModelSpec, RuntimeKind
from waker.scheduling.budget import Budget
from waker.scheduling.placement import candidates

log = logging.getLogger("sparkgate.config")


@dataclass(frozen=True)
class Loaded:
    """models.d as loaded, the nodes it was fitted to, and per model what was derived (`notes`) and what looks
    wrong without stopping the load (`warnings`)."""

    registry: Registry
    nodes: dict[str, NodeConfig]
    notes: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    fit: FitReport = field(default_factory=FitReport)
    """Each model checked alone on its nodes (its warnings are in `warnings` too); `sparkgate check` adds groups."""


def load_models(config_dir: Path, stats_db: Path | None, nodes: Mapping[str, NodeConfig] | None = None, *,
                weights: WeightsReader = weights_gb, gateway: tuple[str, int] | None = None) -> Registry:
    """models.d fitted to `nodes` (see the module doc); its warnings are logged. Raises ConfigError."""
    loaded = load(config_dir, stats_db, nodes, weights=weights, gateway=gateway)
    for model, lines in loaded.warnings.items():
        for line in lines:
            log.warning("models.d: %s: %s", model, line)
    return loaded.registry


def load(config_dir: Path, stats_db: Path | None, nodes: Mapping[str, NodeConfig] | None = None, *,
         weights: WeightsReader = weights_gb, gateway: tuple[str, int] | None = None,
         checkpoints: CheckpointReader = read_checkpoint) -> Loaded:
    """models.d fitted to `nodes` (default: this machine alone), with what was derived and the warnings.

    Nodes whose memory was not resolved yet are read here (blocking: a remote Docker daemon may take seconds); the
    gateway passes the ones it resolved at startup. `weights` gives a trtllm model's weights' size. `gateway` is the
    gateway's own host and port: an engine given that port is refused. `checkpoints` reads the weights for the fit
    check.

    A model marked auto that has never been sampled while ready is a config error: its memory must be declared
    until the sampler has seen it (run it once with a declared value)."""
    registry = load_dir(config_dir)
    resolved = compose.resolve_nodes(nodes if nodes is not None else compose.LOCAL)
    budgets = {name: Budget(n.total_gb or 0.0, n.reserve_gb) for name, n in resolved.items()}
    labels = {name: dict(n.labels) for name, n in resolved.items()}
    local_nodes = [name for name, n in resolved.items() if n.is_local()]
    needs_stats = any(s.memory_auto or _learns_sleep(s) for s in registry.values())
    specs: list[ModelSpec] = []
    problems: list[str] = port_problems(registry.values(), local_nodes, gateway)
    notes: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    places: dict[str, tuple[str, ...]] = {}
    with ExitStack() as stack:
        store, no_store = _open_stats(stats_db) if needs_stats else (None, None)
        if store is not None:
            stack.callback(store.close)
        for spec in registry.values():
            where = candidates(spec.model_copy(update={"memory_gb": 0.0}), budgets, labels)
            places[spec.name] = where
            learned_notes: list[str] = []
            learned_warnings: list[str] = []
            if spec.memory_auto:
                auto = _learned_memory(store, no_store or f" in {stats_db}", spec, where, resolved, budgets)
                if isinstance(auto, str):
                    problems.append(auto)
                    continue
                spec = spec.model_copy(update={"memory_gb": auto.gb})
                learned_notes.append(f"memory_gb {auto.gb:g} GB (auto: {auto.source}, {auto.peak:.2f} GB x 1.2)")
                if auto.capped:
                    biggest = max(where, key=lambda n: budgets[n].capacity_gb)
                    learned_warnings.append(
                        f"memory_gb: auto learned {auto.wanted:g} GB ({auto.peak:.2f} GB x 1.2), more than the largest "
                        f"node it may run on holds ({biggest}: {budgets[biggest].capacity_gb:g} GB); holding "
                        f"{auto.gb:g} GB, so the margin above its measured peak is smaller")
            problem = sleep_level_problem(spec, _unified_on(spec, where, resolved))
            if problem is not None:
                problems.append(problem)
                continue
            fit = fit_fraction(spec, [resolved[n].total_gb or 0.0 for n in where], weights)
            spec = fit.spec
            said = learned_notes + list(fit.notes)
            if spec.idle_action is IdleAction.SLEEP:
                spec, line = _sleeping(spec, store)
                said.append(line)
            if said:
                notes[spec.name] = said
            if fit.warnings or learned_warnings:
                warnings[spec.name] = learned_warnings + list(fit.warnings)
            specs.append(spec)
    if problems:
        raise ConfigError(problems)
    report = alone(specs, resolved, places, checkpoints)
    for model, lines in report.warnings().items():
        warnings.setdefault(model, []).extend(lines)
    return Loaded(Registry(specs), resolved, notes, warnings, report)


def _learns_sleep(spec: ModelSpec) -> bool:
    return spec.idle_action is IdleAction.SLEEP and spec.sleep_memory_gb is None


def _open_stats(stats_db: Path | None) -> tuple[SampleStore | None, str | None]:
    """The stats store, or None and why not: a missing file (nothing sampled yet) or one that can't be opened (the
    gateway runs without stats then; models that learn from them say so)."""
    if stats_db is None or not stats_db.exists():
        return None, None
    try:
        return SampleStore(stats_db), None
    except StoreUnavailable as exc:
        log.warning("stats disabled: %s", exc)
        return None, f": the stats database can't be read ({exc})"


def _learned_memory(store: SampleStore | None, missing: str, spec: ModelSpec, where: tuple[str, ...],
                    nodes: Mapping[str, NodeConfig], budgets: Mapping[str, Budget]) -> LearnedMemory | str:
    """What `memory_gb: auto` becomes for `spec` (stats/learned.py), capped at its largest candidate node's
    capacity; or the config error that says why nothing trustworthy was learned yet and what to do (`missing`:
    why there is no store, as the end of a sentence)."""
    unified = _unified_on(spec, where, nodes)
    ceiling = max((budgets[n].capacity_gb for n in where), default=None)
    learned = None if store is None else learn_memory(store, spec.name, unified=bool(unified),
                                                      spec_hash=spec.spec_hash(), ceiling=ceiling)
    if learned is not None:
        return learned
    said = f"{spec.source}: memory_gb: 'auto' but {spec.name} has no learned footprint yet"
    if store is None:
        return f"{said}{missing}; declare memory_gb until the stats sampler has seen it ready"
    if unified:
        return (f"{said} that can be trusted: {', '.join(unified)} has unified memory, where only what the machine "
                f"loses over a start measures it (an engine's own figures miss its GPU allocations), and no start of "
                f"it was measured (one overlapping another start, wake, sleep or stop there does not count); declare "
                f"memory_gb and let it start once alone, ready for 2 minutes, so that the stats sampler measures it")
    return f"{said} in {store.path}; declare memory_gb until the stats sampler has seen it ready"


def _unified_on(spec: ModelSpec, where: tuple[str, ...], nodes: Mapping[str, NodeConfig]) -> list[str]:
    """The nodes with unified memory `spec` may run on; for a process, this machine (its local nodes)."""
    if spec.runtime is RuntimeKind.PROCESS:
        return [n for n, node in nodes.items() if node.is_local() and node.unified_memory][:1]
    return [n for n in where if nodes[n].unified_memory]


def _sleeping(spec: ModelSpec, store: SampleStore | None) -> tuple[ModelSpec, str]:
    """`spec` with its sleeping footprint learned where the stats know it, and the line that says where it's from."""
    if spec.sleep_memory_gb is not None:
        return spec, f"asleep {spec.sleeping_gb:g} GB (sleep_memory_gb)"
    if store is not None:
        learned = learned_sleep_gb(store, spec.name, spec_hash=spec.spec_hash())
        if learned is not None:
            held = min(learned, spec.memory_gb)
            capped = f", capped at memory_gb {spec.memory_gb:g}" if held < learned else ""
            spec = spec.model_copy(update={"sleep_memory_gb": held, "sleep_memory_learned": True})
            return spec, f"asleep {held:g} GB (learned: the sleep peak in the stats x 1.2{capped})"
    if spec.sleep_level == 1:
        keeps = ("the weights stay in host RAM, the same pool on unified memory" if spec.engine is EngineKind.VLLM
                 else "the weights stay in GPU memory")
        return spec, (f"asleep {spec.sleeping_gb:g} GB (default for sleep_level 1: memory_gb, since {keeps}; an "
                      "over-count until the stats have seen it asleep)")
    return spec, (f"asleep {spec.sleeping_gb:g} GB (default for sleep_level 2: min(4, memory_gb); learned once the "
                  "stats have seen it asleep)")


__all__ = ["Loaded", "load", "load_models"]
