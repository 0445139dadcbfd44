"""`memory_gb: auto` at load (gateway/config.py over stats/learned.py): on unified memory only a start measured by what
the machine lost counts, with nothing trustworthy the entry is refused with what to do, and the learned figure is
capped at the largest node the model may run on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import load
from stats.learned import learn_memory
from stats.store import Drop, Sample, SampleStore
from waker.config.machine import MemoryReading, resolve_nodes
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError
from waker.config.spec import ModelSpec

T0 = 1_700_000_000.0
UNUSED = MemoryReading(None, None, "unused")


def nodes(**configs: NodeConfig) -> dict[str, NodeConfig]:
    return resolve_nodes(configs, local=lambda: UNUSED, remote=lambda url: UNUSED)


SPARK = nodes(local=NodeConfig(total_gb=128, unified_memory=True))
DISCRETE = nodes(local=NodeConfig(total_gb=128, unified_memory=False))
AUTO = {"name": "chat", "runtime": "docker", "engine": "generic", "image": "x", "command": ["serve"],
        "memory_gb": "auto"}


def models_d(tmp_path: Path, **fields: object) -> Path:
    directory = tmp_path / "models.d"
    directory.mkdir(exist_ok=True)
    (directory / "chat.yaml").write_text(yaml.safe_dump({**AUTO, **fields}))
    return directory


def spec_hash(directory: Path) -> str:
    """The configuration the sampler records for the entry: memory_gb is not part of it."""
    entry = yaml.safe_load((directory / "chat.yaml").read_text())
    return ModelSpec.model_validate({**entry, "memory_gb": 1}).spec_hash()


def sampled(db: Path, model: str, spec: str, footprint: float) -> None:
    """A load and a READY sample whose per-engine footprint is `footprint` (a container's cgroup)."""
    with SampleStore(db) as store:
        store.add([Sample(T0, model, "load", cgroup=footprint, spec_hash=spec),
                   Sample(T0 + 5, model, "steady", cgroup=footprint, spec_hash=spec)])


def dropped(db: Path, model: str, spec: str, gib: float) -> None:
    with SampleStore(db) as store:
        store.add_drops([Drop(T0 + 200, T0, model, "local", 120.0, 120.0 - gib, spec)])


def test_on_unified_memory_per_engine_samples_are_not_trusted(tmp_path: Path) -> None:
    directory, db = models_d(tmp_path), tmp_path / "stats.sqlite3"
    sampled(db, "chat", spec_hash(directory), 3.0)  # the host side of a 70 GB vLLM engine on a GB10
    with pytest.raises(ConfigError) as refused:
        load(directory, db, SPARK)
    said = str(refused.value)
    assert "memory_gb: 'auto' but chat has no learned footprint yet that can be trusted" in said
    assert "local has unified memory" in said and "no start of it was measured" in said
    assert "declare memory_gb and let it start once alone" in said
    assert load(directory, db, DISCRETE).registry["chat"].memory_gb == 3.6  # where the samples are right


def test_on_unified_memory_auto_learns_the_drop_of_a_lone_start(tmp_path: Path) -> None:
    directory, db = models_d(tmp_path), tmp_path / "stats.sqlite3"
    spec = spec_hash(directory)
    sampled(db, "chat", spec, 3.0)
    dropped(db, "chat", spec, 70.0)
    dropped(db, "chat", "another-configuration", 90.0)
    loaded = load(directory, db, SPARK)
    assert loaded.registry["chat"].memory_gb == 84.0  # 70 x 1.2
    assert loaded.notes["chat"][0] == ("memory_gb 84 GB (auto: the largest drop of MemAvailable over a start alone "
                                       "on unified memory, 70.00 GB x 1.2)")
    assert "chat" not in loaded.warnings


def test_a_learned_figure_above_the_largest_node_is_capped_with_a_warning(tmp_path: Path) -> None:
    directory, db = models_d(tmp_path), tmp_path / "stats.sqlite3"
    dropped(db, "chat", spec_hash(directory), 101.0)
    loaded = load(directory, db, nodes(local=NodeConfig(total_gb=128, reserve_gb=8, unified_memory=True)))
    assert loaded.registry["chat"].memory_gb == 120.0  # 121.2 would be refused by a 120 GB budget
    [warning] = loaded.warnings["chat"]
    assert "learned 121.2 GB (101.00 GB x 1.2)" in warning and "(local: 120 GB); holding 120 GB" in warning
    # Of several nodes, the largest it may run on is the ceiling.
    two = nodes(local=NodeConfig(total_gb=128, reserve_gb=8, unified_memory=True),
                big=NodeConfig(total_gb=256, reserve_gb=8, unified_memory=True, docker_host="tcp://big:2375"))
    assert load(directory, db, two).registry["chat"].memory_gb == 121.2
    assert "chat" not in load(directory, db, two).warnings


def test_a_sampled_peak_above_the_node_is_capped_rather_than_refused(tmp_path: Path) -> None:
    directory, db = models_d(tmp_path), tmp_path / "stats.sqlite3"
    sampled(db, "chat", spec_hash(directory), 101.0)  # separate memory: the per-engine peak is right
    loaded = load(directory, db, nodes(local=NodeConfig(total_gb=128, reserve_gb=8, unified_memory=False)))
    assert loaded.registry["chat"].memory_gb == 120.0
    assert "learned 121.2 GB (101.00 GB x 1.2)" in loaded.warnings["chat"][0]


def test_nothing_learned_without_a_stats_database(tmp_path: Path) -> None:
    directory = models_d(tmp_path)
    with pytest.raises(ConfigError, match=r"no learned footprint yet in .*missing\.sqlite3; declare memory_gb"):
        load(directory, tmp_path / "missing.sqlite3", DISCRETE)


def test_learn_memory_takes_the_larger_of_a_drop_and_a_per_engine_peak(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "stats.sqlite3") as store:
        store.add([Sample(T0, "m", "steady", cgroup=50.0, gpu=30.0, spec_hash="h")])  # on a discrete node
        assert learn_memory(store, "m", unified=True, spec_hash="h") is None  # no drop: nothing trustworthy
        store.add_drops([Drop(T0 + 9, T0, "m", "local", 100.0, 40.0, "h")])
        learned = learn_memory(store, "m", unified=True, spec_hash="h")
        assert learned is not None and (learned.peak, learned.gb, learned.capped) == (80.0, 96.0, False)
        capped = learn_memory(store, "m", unified=False, spec_hash="h", ceiling=90.05)
        assert capped is not None and (capped.gb, capped.wanted, capped.capped) == (90.0, 96.0, True)
        with pytest.raises(ValueError, match="margin"):
            learn_memory(store, "m", unified=False, margin=0.5)
