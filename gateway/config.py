"""Loading models.d as the gateway uses it: validated, with `memory_gb: auto` resolved from the
footprints the stats sampler learned."""

from pathlib import Path

from waker.config.registry import ConfigError, Registry, load_dir


def load_models(config_dir: Path, stats_db: Path | None) -> Registry:
    """models.d, with every `memory_gb: auto` replaced by its learned peak x margin.

    A model marked auto that has never been sampled while ready is a config error: its memory must
    be declared until the sampler has seen it (run it once with a declared value)."""
    registry = load_dir(config_dir)
    auto = [spec for spec in registry.values() if spec.memory_auto]
    if not auto:
        return registry
    from stats import SampleStore, learned_memory_gb

    learned: dict[str, float | None] = {}
    if stats_db is not None and stats_db.exists():
        store = SampleStore(stats_db)
        try:
            learned = {s.name: learned_memory_gb(store, s.name, spec_hash=s.spec_hash()) for s in auto}
        finally:
            store.close()
    problems = [f"{s.source}: memory_gb: 'auto' but {s.name} has no learned footprint yet in {stats_db}; declare "
                "memory_gb until the stats sampler has seen it ready" for s in auto if learned.get(s.name) is None]
    if problems:
        raise ConfigError(problems)
    return Registry([s.model_copy(update={"memory_gb": learned[s.name]}) if s.memory_auto else s
                     for s in registry.values()])
