#!/usr/bin/env python3
"""How long the loader waits for a learned peak: 90 days of samples at one every 5 s (1.5 M rows for one model).

`memory_gb: auto` and the learned sleep figures are read on every load and reload of models.d. They used to read
every stored sample of the model into Python (6.6 s and 530 MB for these 90 days); SQLite computes them now
(stats/store.py). This script fills a temporary database, then times each query the loader and `sparkgate stats`
make, with the memory Python allocated for it (tracemalloc's peak), and, with --python, the old way for comparison.

    .venv/bin/python bench/stats_peak.py [--days 90] [--interval 5] [--python]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stats.learned import learned_memory_gb, learned_sleep_gb
from stats.store import Drop, Sample, SampleStore

T0 = 1_700_000_000.0


def history(days: float, interval: float) -> Iterator[Sample]:
    """One model's days: a load at the start of each, ready most of it, asleep for its last hours."""
    rng = random.Random(7)
    per_day = int(86400 / interval)
    for day in range(int(days)):
        for i in range(per_day):
            ts = T0 + day * 86400 + i * interval
            phase = "load" if i < 60 else ("sleep" if i > per_day * 0.8 else "steady")
            value = 3.0 if phase == "sleep" else 60.0 + rng.random() * 8
            yield Sample(ts, "big", phase, cgroup=value, system_available=120.0 - value, spec_hash="h",
                         declared_gb=70.0)


def timed(label: str, call: Callable[[], object]) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shown = f"{len(result)} rows" if isinstance(result, list | dict) else result
    print(f"{label:<42} {seconds:9.4f} s  {peak / 2**20:8.1f} MiB  -> {shown}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=90)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--python", action="store_true", help="also time the old way: every sample into Python")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, SampleStore(Path(folder) / "stats.sqlite3") as store:
        started = time.perf_counter()
        batch: list[Sample] = []
        for sample in history(args.days, args.interval):
            batch.append(sample)
            if len(batch) == 100_000:
                store.add(batch)
                batch = []
        store.add(batch)
        store.add_drops([Drop(T0 + day * 86400 + 600, T0 + day * 86400, "big", "local", 120.0, 50.0, "h")
                         for day in range(int(args.days))])
        rows = int(args.days * 86400 / args.interval)
        print(f"{rows} samples written in {time.perf_counter() - started:.1f} s "
              f"({(Path(folder) / 'stats.sqlite3').stat().st_size / 2**20:.0f} MiB file)\n")
        timed("learned_memory_gb (memory_gb: auto)", lambda: learned_memory_gb(store, "big", spec_hash="h"))
        timed("learned_sleep_gb (sleep_memory_gb)", lambda: learned_sleep_gb(store, "big", spec_hash="h"))
        timed("learned_drop (auto on unified memory)", lambda: store.learned_drop("big", spec_hash="h"))
        timed("footprints (sparkgate stats)", store.footprints)
        if args.python:
            def old_peak() -> float | None:
                values = [s.footprint for s in store.samples("big", spec_hash="h") if s.phase != "sleep"]
                return max((v for v in values if v is not None), default=None)

            timed("every sample into Python (the old way)", old_peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
