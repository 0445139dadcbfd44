"""Loading models.d as the gateway uses it: validated, then fitted to the nodes it runs on and to what the stats
sampler learned.

At load (startup, `sparkgate check`, every reload), with the nodes' memory known (waker/config/machine.py):

* `memory_gb: auto` becomes the learned peak x margin (an entry never sampled while ready is an error);
* vLLM's `sleep_level: 1` where memory is unified is refused, unless the entry opts in;
* vLLM, SGLang and TensorRT-LLM entries without `gpu_memory_utilization` get one derived from `memory_gb` and the
  node's total (waker/config/engine_memory.py), so the engine takes what the budget counts and not the whole box;
* a sleeping model without `sleep_memory_gb` gets its learned sleep peak x margin once it has been sampled asleep;
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

from stats.learned import learned_memory_gb, learned_sleep_gb
from stats.store import SampleStore
from waker import compose
from waker.config.engine_memory import WeightsReader, fit_fraction, sleep_level_problem, weights_gb
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


def load_models(config_dir: Path, stats_db: Path | None, nodes: Mapping[str, NodeConfig] | None = None, *,
                weights: WeightsReader = weights_gb, gateway: tuple[str, int] | None = None) -> Registry:
    """models.d fitted to `nodes` (see the module doc); its warnings are logged. Raises ConfigError."""
    loaded = load(config_dir, stats_db, nodes, weights=weights, gateway=gateway)
    for model, lines in loaded.warnings.items():
        for line in lines:
            log.warning("models.d: %s: %s", model, line)
    return loaded.registry


def load(config_dir: Path, stats_db: Path | None, nodes: Mapping[str, NodeConfig] | None = None, *,
         weights: WeightsReader = weights_gb, gateway: tuple[str, int] | None = None) -> Loaded:
    """models.d fitted to `nodes` (default: this machine alone), with what was derived and the warnings.

    Nodes whose memory was not resolved yet are read here (blocking: a remote Docker daemon may take seconds); the
    gateway passes the ones it resolved at startup. `weights` gives a trtllm model's weights' size. `gateway` is the
    gateway's own host and port: an engine given that port is refused.

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
    with ExitStack() as stack:
        store = None
        if needs_stats and stats_db is not None and stats_db.exists():
            store = SampleStore(stats_db)
            stack.callback(store.close)
        for spec in registry.values():
            if spec.memory_auto:
                learned = _learned_memory(store, spec)
                if learned is None:
                    problems.append(f"{spec.source}: memory_gb: 'auto' but {spec.name} has no learned footprint yet "
                                    f"in {stats_db}; declare memory_gb until the stats sampler has seen it ready")
                    continue
                spec = spec.model_copy(update={"memory_gb": learned})
            where = candidates(spec.model_copy(update={"memory_gb": 0.0}), budgets, labels)
            problem = sleep_level_problem(spec, _unified_on(spec, where, resolved))
            if problem is not None:
                problems.append(problem)
                continue
            fit = fit_fraction(spec, [resolved[n].total_gb or 0.0 for n in where], weights)
            spec = fit.spec
            said = list(fit.notes)
            if spec.idle_action is IdleAction.SLEEP:
                spec, line = _sleeping(spec, store)
                said.append(line)
            if said:
                notes[spec.name] = said
            if fit.warnings:
                warnings[spec.name] = list(fit.warnings)
            specs.append(spec)
    if problems:
        raise ConfigError(problems)
    return Loaded(Registry(specs), resolved, notes, warnings)


def _learns_sleep(spec: ModelSpec) -> bool:
    return spec.idle_action is IdleAction.SLEEP and spec.sleep_memory_gb is None


def _learned_memory(store: SampleStore | None, spec: ModelSpec) -> float | None:
    if store is None:
        return None
    return learned_memory_gb(store, spec.name, spec_hash=spec.spec_hash())


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
