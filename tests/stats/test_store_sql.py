"""Peaks and percentiles are computed by SQLite: they agree with the same figures computed in Python over every
sample (what the store did before, and what a reader expects), on random data with every kind of reading missing;
and the learned peaks are answered from the peak index, without a pass over the samples (bench/stats_peak.py
measures the time)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stats.store import Footprint, Sample, SampleStore, footprint_of, percentile

T0 = 1_700_000_000.0


def maybe(rng: random.Random, value: float) -> float | None:
    return None if rng.random() < 0.3 else value


def random_samples(seed: int, count: int = 600) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample(T0 + i, rng.choice(["a", "b", "c"]), rng.choice(["load", "steady", "steady", "sleep"]),
                   rss=maybe(rng, rng.uniform(0, 20)), pss=maybe(rng, rng.uniform(0, 20)),
                   cgroup=maybe(rng, rng.uniform(0, 30)), gpu=maybe(rng, rng.uniform(0, 60)),
                   spec_hash=rng.choice(["h1", "h2", None]), declared_gb=rng.choice([None, 8.0, 16.0]))
            for i in range(count)]


def in_python(samples: list[Sample], since: float | None = None) -> dict[str, Footprint]:
    """The figures computed the plain way: every footprint, sorted in Python."""
    result = {}
    for model in sorted({s.model for s in samples}):
        mine = [s for s in samples if s.model == model and (since is None or s.ts >= since)]
        awake = sorted(s.footprint for s in mine if s.phase != "sleep" and s.footprint is not None)
        if not awake:
            continue

        def peak(phase: str, mine: list[Sample] = mine) -> float | None:
            return max((s.footprint for s in mine if s.phase == phase and s.footprint is not None), default=None)

        result[model] = Footprint(p50=percentile(awake, 50), p95=percentile(awake, 95), peak=awake[-1],
                                  load_peak=peak("load"), steady_peak=peak("steady"), samples=len(awake),
                                  sleep_peak=peak("sleep"), declared_gb=max(mine, key=lambda s: s.ts).declared_gb)
    return result


@pytest.mark.parametrize("seed", range(5))
def test_sql_figures_agree_with_python_over_every_sample(tmp_path: Path, seed: int) -> None:
    samples = random_samples(seed)
    with SampleStore(tmp_path / "stats.sqlite3") as store:
        store.add(samples)
        for since in (None, T0 + 200):
            assert store.footprints(since=since) == in_python(samples, since)  # the same arithmetic: equal
        for model in ("a", "b", "c", "none"):
            for spec_hash in ("h1", "h2", None):
                mine = [s for s in samples if s.model == model and (spec_hash is None or s.spec_hash == spec_hash)]
                awake = [s.footprint for s in mine if s.phase != "sleep" and s.footprint is not None]
                ready = any(s.phase == "steady" and s.footprint is not None for s in mine)
                assert store.learned_peak(model, spec_hash=spec_hash) == (max(awake) if ready else None)
                asleep = [s.footprint for s in mine if s.phase == "sleep" and s.footprint is not None]
                assert store.learned_sleep_peak(model, spec_hash=spec_hash) == max(asleep, default=None)


def test_the_sql_footprint_rule_is_the_python_one(tmp_path: Path) -> None:
    values = (None, 0.0, 1.5, 7.0)
    readings = [(rss, pss, cgroup, gpu) for rss in values for pss in values for cgroup in values for gpu in values]
    with SampleStore(tmp_path / "stats.sqlite3") as store:
        store.add([Sample(T0 + i, "m", "steady", rss=r, pss=p, cgroup=c, gpu=g)
                   for i, (r, p, c, g) in enumerate(readings)])
        stored = [row[0] for row in store._query("SELECT footprint FROM samples ORDER BY ts", [])]
    assert stored == [footprint_of(*reading) for reading in readings]


def test_learned_peaks_are_one_seek_in_the_peak_index(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "stats.sqlite3") as store:
        plans = [" ".join(row[-1] for row in store._query(f"EXPLAIN QUERY PLAN {sql}", ["m", "h"])) for sql in (
            "SELECT max(footprint) FROM samples WHERE 1 AND model = ? AND spec_hash = ? AND phase = 'steady'",
            "SELECT max(footprint) FROM samples WHERE 1 AND model = ? AND spec_hash = ? AND phase = 'sleep'")]
    for plan in plans:
        assert plan == "SEARCH samples USING INDEX samples_peak (model=? AND spec_hash=? AND phase=?)"
