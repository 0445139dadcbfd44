"""What a sleeping engine keeps, learned from the samples taken while it slept, and used by the loader in place of
the default sleep_memory_gb."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.config import load
from stats.learned import learned_sleep_gb
from stats.store import Sample, SampleStore
from waker.config.machine import MemoryReading, resolve_nodes
from waker.config.nodes import NodeConfig

T0 = 1_700_000_000.0
UNUSED = MemoryReading(None, None, "unused")
SPARK = resolve_nodes({"local": NodeConfig(total_gb=128, unified_memory=True)},
                      local=lambda: UNUSED, remote=lambda url: UNUSED)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SampleStore]:
    with SampleStore(tmp_path / "stats.sqlite3") as opened:
        yield opened


def samples(model: str, phase: str, values: list[float], spec_hash: str | None = "h1",
            start: float = T0) -> list[Sample]:
    return [Sample(start + 5 * i, model, phase, pss=v, spec_hash=spec_hash) for i, v in enumerate(values)]


def test_nothing_is_learned_until_the_model_was_sampled_asleep(store: SampleStore) -> None:
    store.add(samples("a", "load", [30.0]) + samples("a", "steady", [25.0], start=T0 + 10))
    assert learned_sleep_gb(store, "a") is None  # awake samples say nothing about sleep
    store.add(samples("a", "sleep", [3.1, 3.4, 2.9], start=T0 + 20))
    assert learned_sleep_gb(store, "a") == 4.1  # 3.4 x 1.2 = 4.08, rounded up to a tenth
    assert learned_sleep_gb(store, "a", margin=1.0) == 3.4
    assert learned_sleep_gb(store, "b") is None
    with pytest.raises(ValueError, match="margin"):
        learned_sleep_gb(store, "a", margin=0.5)


def test_only_samples_of_the_same_engine_configuration_count(store: SampleStore) -> None:
    store.add(samples("a", "sleep", [20.0], spec_hash="level-1") + samples("a", "sleep", [3.0], spec_hash="level-2"))
    assert learned_sleep_gb(store, "a", spec_hash="level-2") == 3.6
    assert learned_sleep_gb(store, "a", spec_hash="never-slept") is None
    assert learned_sleep_gb(store, "a") == 24.0


def write(directory: Path, **entry: object) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / f"{entry['name']}.yaml").write_text(yaml.safe_dump(entry))
    return directory


def chat(directory: Path, **fields: object) -> Path:
    return write(directory, name="chat", engine="vllm", runtime="docker", image="vllm/vllm-openai", model="org/chat",
                 memory_gb=20, idle_action="sleep", **fields)


def test_the_loader_uses_the_learned_sleep_peak_and_marks_it(tmp_path: Path) -> None:
    db = tmp_path / "stats.sqlite3"
    directory = chat(tmp_path / "m")
    before = load(directory, db, SPARK).registry["chat"]
    assert (before.sleeping_gb, before.sleep_memory_learned) == (4.0, False)  # the default at level 2
    # The sampler records the spec the waker runs: the one with its derived fraction.
    with SampleStore(db) as store:
        store.add(samples("chat", "sleep", [2.5], spec_hash=before.spec_hash()))
        store.add(samples("chat", "sleep", [9.0], spec_hash="another-configuration"))
    loaded = load(directory, db, SPARK)
    after = loaded.registry["chat"]
    assert (after.sleep_memory_gb, after.sleeping_gb, after.sleep_memory_learned) == (3.0, 3.0, True)
    assert after.spec_hash() == before.spec_hash()  # policy: the running engine is kept
    assert "asleep 3 GB (learned: the sleep peak in the stats x 1.2)" in loaded.notes["chat"]
    assert "sleep_memory_learned" not in after.model_dump()


def test_a_learned_sleep_is_never_above_memory_gb_and_a_declared_one_wins(tmp_path: Path) -> None:
    db = tmp_path / "stats.sqlite3"
    directory = chat(tmp_path / "m", gpu_memory_utilization=0.15)
    spec = load(directory, db, SPARK).registry["chat"]
    with SampleStore(db) as store:
        store.add(samples("chat", "sleep", [19.0], spec_hash=spec.spec_hash()))  # level 1 keeping its weights
    loaded = load(directory, db, SPARK)
    assert loaded.registry["chat"].sleep_memory_gb == 20  # 22.8 learned, capped at memory_gb
    assert "capped at memory_gb 20" in loaded.notes["chat"][-1]
    chat(tmp_path / "m", gpu_memory_utilization=0.15, sleep_memory_gb=5)
    declared = load(directory, db, SPARK).registry["chat"]
    assert (declared.sleep_memory_gb, declared.sleep_memory_learned) == (5, False)


def test_a_model_that_does_not_sleep_learns_nothing(tmp_path: Path) -> None:
    db = tmp_path / "stats.sqlite3"
    directory = write(tmp_path / "m", name="s", engine="vllm", model="org/s", memory_gb=20)
    spec = load(directory, db, SPARK).registry["s"]
    with SampleStore(db) as store:
        store.add(samples("s", "sleep", [2.0], spec_hash=spec.spec_hash()))
    assert load(directory, db, SPARK).registry["s"].sleep_memory_gb is None
