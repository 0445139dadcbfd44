"""The SQLite store: round trip, the footprint rule, percentiles, learned peaks, CSV, pruning."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest

from stats.learned import learned_memory_gb
from stats.store import Footprint, Sample, SampleStore, footprint_of, percentile

T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> SampleStore:
    with SampleStore(tmp_path / "stats" / "samples.sqlite3") as opened:
        yield opened


def series(model: str, phase: str, values: list[float], start: float = T0, step: float = 5.0,
           spec_hash: str | None = "h1") -> list[Sample]:
    """Process-runtime samples whose footprint is `values` (as PSS)."""
    return [Sample(start + i * step, model, phase, rss=v + 1, pss=v, system_available=100 - v, spec_hash=spec_hash)
            for i, v in enumerate(values)]


def test_samples_round_trip_in_time_order(store: SampleStore) -> None:
    later = Sample(T0 + 10, "a", "steady", cgroup=3.5, gpu=8.0, system_available=50.0, spec_hash="x")
    earlier = Sample(T0, "a", "load", rss=1.0, pss=None, spec_hash=None)
    other = Sample(T0 + 5, "b", "sleep", rss=0.5, pss=0.25, gpu=None)
    assert store.add([later, earlier, other]) == 3
    assert store.samples() == [earlier, other, later]
    assert store.samples("a") == [earlier, later]
    assert store.samples(since=T0 + 5) == [other, later]
    assert store.samples("a", spec_hash="x") == [later]
    assert store.path.parent.name == "stats"  # the folder is made


def test_the_store_is_in_wal_mode_and_readable_while_written(store: SampleStore) -> None:
    store.add(series("a", "steady", [1.0]))
    reader = sqlite3.connect(store.path)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert reader.execute("SELECT count(*) FROM samples").fetchone() == (1,)
    finally:
        reader.close()


def test_unknown_phase_is_refused(store: SampleStore) -> None:
    with pytest.raises(ValueError, match="unknown phase"):
        store.add([Sample(T0, "a", "stopping", rss=1.0)])
    assert store.samples() == []


def test_the_footprint_rule() -> None:
    assert footprint_of(rss=10.0, pss=6.0, cgroup=None, gpu=None) == 6.0  # PSS: shared pages counted once
    assert footprint_of(rss=10.0, pss=None, cgroup=None, gpu=None) == 10.0  # RSS only where PSS is unknown
    assert footprint_of(rss=None, pss=None, cgroup=12.0, gpu=None) == 12.0  # containers
    assert footprint_of(rss=3.0, pss=2.0, cgroup=5.0, gpu=None) == 5.0  # both: the larger host figure
    assert footprint_of(rss=3.0, pss=2.0, cgroup=None, gpu=8.0) == 10.0  # device memory is added
    assert footprint_of(rss=None, pss=None, cgroup=None, gpu=8.0) == 8.0
    assert footprint_of(rss=None, pss=None, cgroup=None, gpu=None) is None


def test_percentiles_interpolate_like_numpy() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.5
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 100) == 10.0
    assert percentile([4.0], 95) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_footprints_from_known_samples(store: SampleStore) -> None:
    # Model a: a load spike to 30 GiB, then 1..10 GiB while ready, then asleep at 2.
    store.add(series("a", "load", [5.0, 30.0], start=T0))
    store.add(series("a", "steady", [float(v) for v in range(1, 11)], start=T0 + 10))
    store.add(series("a", "sleep", [2.0, 1.5], start=T0 + 100))
    store.add([Sample(T0, "b", "steady", cgroup=4.0), Sample(T0 + 5, "b", "steady", cgroup=6.0)])
    store.add([Sample(T0, "c", "steady", system_available=10.0)])  # nothing per model: no footprint
    store.add(series("d", "sleep", [1.0]))  # only ever seen asleep

    footprints = store.footprints()
    assert list(footprints) == ["a", "b"]
    awake = sorted([5.0, 30.0, *range(1, 11)])
    assert footprints["a"] == Footprint(
        p50=percentile(awake, 50), p95=percentile(awake, 95), peak=30.0, load_peak=30.0, steady_peak=10.0,
        samples=12, sleep_peak=2.0)
    assert footprints["a"].p50 == 5.5 and footprints["a"].p95 == pytest.approx(19.0)  # 10 + 0.45 * (30 - 10)
    assert footprints["b"] == Footprint(p50=5.0, p95=5.9, peak=6.0, load_peak=None, steady_peak=6.0, samples=2)
    recent = store.footprints(since=T0 + 10)["a"]  # the load is older than that
    assert recent.load_peak is None and recent.peak == 10.0 and recent.samples == 10


def test_learned_peak_waits_for_a_ready_sample(store: SampleStore) -> None:
    store.add(series("a", "load", [5.0, 30.0]))
    assert store.learned_peak("a") is None  # loaded part way: would understate
    assert learned_memory_gb(store, "a") is None
    store.add(series("a", "steady", [20.0, 21.0], start=T0 + 10))
    store.add(series("a", "sleep", [50.0], start=T0 + 20))  # never the peak: sleep is counted apart
    assert store.learned_peak("a") == 30.0  # the load spike is part of what it needs
    assert learned_memory_gb(store, "a") == 36.0
    assert learned_memory_gb(store, "a", margin=1.05) == 31.5
    assert learned_memory_gb(store, "unknown") is None
    with pytest.raises(ValueError, match="margin"):
        learned_memory_gb(store, "a", margin=0.9)


def test_learned_peak_of_one_engine_configuration(store: SampleStore) -> None:
    store.add(series("a", "steady", [40.0], spec_hash="old"))
    store.add(series("a", "steady", [20.0], start=T0 + 5, spec_hash="new"))
    assert store.learned_peak("a") == 40.0
    assert store.learned_peak("a", spec_hash="new") == 20.0
    assert learned_memory_gb(store, "a", spec_hash="new") == 24.0
    assert learned_memory_gb(store, "a", spec_hash="never-ran") is None


def test_learned_memory_rounds_up_to_a_tenth() -> None:
    class Peak:
        def learned_peak(self, model: str, **_: object) -> float:
            return 10.01

    assert learned_memory_gb(Peak(), "a") == 12.1  # type: ignore[arg-type]  # 12.012 -> 12.1, never below


def test_csv_export(store: SampleStore, tmp_path: Path) -> None:
    store.add([Sample(T0, "a", "load", rss=2.0, pss=1.5, gpu=8.0, system_available=90.0, spec_hash="h"),
               Sample(T0 + 5, "b", "steady", cgroup=3.25)])
    out = tmp_path / "samples.csv"
    assert store.export_csv(out) == 2
    rows = list(csv.DictReader(out.open()))
    assert rows[0] == {
        "time": "2023-11-14T22:13:20+00:00", "ts": "1700000000.000", "model": "a", "phase": "load",
        "footprint_gib": "9.5000", "rss_gib": "2.0000", "pss_gib": "1.5000", "cgroup_gib": "", "gpu_gib": "8.0000",
        "system_available_gib": "90.0000", "spec_hash": "h"}
    assert rows[1]["model"] == "b" and rows[1]["footprint_gib"] == "3.2500" and rows[1]["rss_gib"] == ""
    assert store.export_csv(out, since=T0 + 1) == 1


def test_prune_drops_old_samples(store: SampleStore) -> None:
    store.add(series("a", "steady", [1.0, 2.0, 3.0]))
    assert store.prune(T0 + 6) == 2
    assert [s.ts for s in store.samples()] == [T0 + 10]
