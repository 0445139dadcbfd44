"""Memory samples in SQLite, and the footprints learned from them.

One table, one row per model per sampling round, every figure in GiB (like every "GB" in sparkgate). SQLite in WAL
mode: the gateway's sampler writes while ``sparkgate stats`` reads the same file from another process, and neither
blocks the other.

The footprint rule (one place: :func:`footprint_of`): what one sample says the model takes is

    host = max(cgroup, pss if known else rss)     (whichever of these were read)
    footprint = host + gpu                        (gpu: NVML per-process device memory; absent counts 0)

* host: containers are read through their memory cgroup, processes through PSS summed over their process group
  (RSS where PSS can't be read, which over-counts pages shared between workers: the safe side for a budget). If a
  sample had both a cgroup and a process figure, the larger is kept.
* gpu is *added*, not maxed: on discrete GPUs device memory is a separate pool that no host figure shows. On a
  unified-memory GB10, CUDA allocations are made by the driver and appear neither in a process's RSS/PSS nor in
  its memory cgroup, so adding them is still what the engine takes from the shared pool (there NVML usually
  cannot give the per-process figure at all, and the sample has host memory only). Memory that could be counted in
  both (managed memory migrated to host pages) is then counted twice: an overestimate, the safe side for a budget.
"""

from __future__ import annotations

import csv
import math
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from os import environ
from pathlib import Path

PHASES = ("load", "steady", "sleep")
"""load: STARTING or WAKING; steady: READY; sleep: SLEEPING."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    ts REAL NOT NULL,               -- unix time
    model TEXT NOT NULL,
    phase TEXT NOT NULL,            -- load | steady | sleep
    rss REAL,                       -- GiB, summed over the process group (process runtime)
    pss REAL,                       -- GiB, likewise
    cgroup REAL,                    -- GiB, container memory cgroup minus inactive file cache (docker runtime)
    gpu REAL,                       -- GiB, NVML per-process device memory
    system_available REAL,          -- GiB, MemAvailable of the gateway's machine
    spec_hash TEXT                  -- ModelSpec.spec_hash(): footprints of another engine config don't count
);
CREATE INDEX IF NOT EXISTS samples_model_ts ON samples (model, ts);
"""


@dataclass(frozen=True, slots=True)
class Sample:
    """One model's memory at one moment; None where that reading doesn't apply or couldn't be had."""

    ts: float
    model: str
    phase: str
    rss: float | None = None
    pss: float | None = None
    cgroup: float | None = None
    gpu: float | None = None
    system_available: float | None = None
    spec_hash: str | None = None

    @property
    def footprint(self) -> float | None:
        return footprint_of(self.rss, self.pss, self.cgroup, self.gpu)


def footprint_of(rss: float | None, pss: float | None, cgroup: float | None, gpu: float | None) -> float | None:
    """What the model takes, by the rule in this module's docstring; None when the sample has no per-model figure."""
    process = pss if pss is not None else rss
    host = [x for x in (cgroup, process) if x is not None]
    if not host and gpu is None:
        return None
    return (max(host) if host else 0.0) + (gpu or 0.0)


@dataclass(frozen=True, slots=True)
class Footprint:
    """One model's memory over a period, GiB. p50, p95 and peak are over its awake samples (load and steady): what
    it holds while it can serve; a sleeping engine's memory is ``sleep_peak``, apart."""

    p50: float
    p95: float
    peak: float
    load_peak: float | None  # while starting or waking: vLLM's profiling run and CUDA graph capture peak here
    steady_peak: float | None  # while ready
    samples: int  # awake samples with a footprint
    sleep_peak: float | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on values already sorted."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def default_db_path() -> Path:
    """``$XDG_STATE_HOME/sparkgate/stats.sqlite3`` (``~/.local/state/...``): state worth keeping across restarts, not
    a cache (the learned footprints feed ``memory_gb: auto``)."""
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sparkgate" / "stats.sqlite3"


_COLUMNS = ("ts", "model", "phase", "rss", "pss", "cgroup", "gpu", "system_available", "spec_hash")


class SampleStore:
    """The samples table. One connection shared by threads (the sampler writes from a worker thread), under a lock."""

    def __init__(self, path: str | Path, *, timeout: float = 5.0) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last samples
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, samples: Iterable[Sample]) -> int:
        rows = [tuple(getattr(s, c) for c in _COLUMNS) for s in samples]
        for row in rows:
            if row[2] not in PHASES:
                raise ValueError(f"unknown phase {row[2]!r}; expected one of {', '.join(PHASES)}")
        if rows:
            with self._lock, self._db:
                self._db.execute("BEGIN")
                self._db.executemany(f"INSERT INTO samples ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 9)})",
                                     rows)
        return len(rows)

    def samples(self, model: str | None = None, *, since: float | None = None,
                spec_hash: str | None = None) -> list[Sample]:
        """Samples in time order, optionally of one model, from unix time ``since``, of one engine config."""
        where, args = _filters(model, since, spec_hash)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM samples {where} ORDER BY ts, model", args
            ).fetchall()
        return [Sample(*row) for row in rows]

    def footprints(self, since: float | None = None) -> dict[str, Footprint]:
        """Every sampled model's footprint from unix time ``since`` (all time by default), by model name."""
        by_model: dict[str, dict[str, list[float]]] = {}
        for sample in self.samples(since=since):
            value = sample.footprint
            if value is not None:
                by_model.setdefault(sample.model, {p: [] for p in PHASES})[sample.phase].append(value)
        result = {}
        for model, phases in sorted(by_model.items()):
            awake = sorted(phases["load"] + phases["steady"])
            if not awake:
                continue  # only ever seen asleep (adopted while sleeping): no awake footprint to tell
            result[model] = Footprint(
                p50=percentile(awake, 50), p95=percentile(awake, 95), peak=awake[-1],
                load_peak=max(phases["load"], default=None), steady_peak=max(phases["steady"], default=None),
                samples=len(awake), sleep_peak=max(phases["sleep"], default=None),
            )
        return result

    def learned_peak(self, model: str, *, spec_hash: str | None = None, since: float | None = None) -> float | None:
        """The largest awake footprint of ``model`` (GiB), or None until it has been seen READY at least once.

        Samples taken only while loading (an engine that failed or was stopped mid-start) never finished allocating:
        their peak would understate what the model needs. Once one READY sample exists, the load that led to it was
        sampled through its end. With ``spec_hash``, only samples of that engine configuration count: other flags
        (``--max-model-len``, ``gpu_memory_utilization``) mean another footprint.
        """
        peak: float | None = None
        steady = False
        for sample in self.samples(model, since=since, spec_hash=spec_hash):
            value = sample.footprint
            if value is None or sample.phase == "sleep":
                continue
            steady = steady or sample.phase == "steady"
            peak = value if peak is None else max(peak, value)
        return peak if steady else None

    def export_csv(self, path: str | Path, *, since: float | None = None) -> int:
        """Write every sample (from ``since``) as CSV, with the footprint and an ISO time; returns the row count."""
        count = 0
        with Path(path).expanduser().open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time", "ts", "model", "phase", "footprint_gib", "rss_gib", "pss_gib", "cgroup_gib",
                             "gpu_gib", "system_available_gib", "spec_hash"])
            for s in self.samples(since=since):
                writer.writerow([
                    datetime.fromtimestamp(s.ts, UTC).isoformat(timespec="seconds"), f"{s.ts:.3f}", s.model,
                    s.phase, *(_fmt(v) for v in (s.footprint, s.rss, s.pss, s.cgroup, s.gpu, s.system_available)),
                    s.spec_hash or "",
                ])
                count += 1
        return count

    def prune(self, before: float) -> int:
        """Delete samples older than unix time ``before``; returns how many. Keeps the file from growing forever."""
        with self._lock, self._db:
            return self._db.execute("DELETE FROM samples WHERE ts < ?", (before,)).rowcount


def _filters(model: str | None, since: float | None, spec_hash: str | None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    for clause, value in (("model = ?", model), ("ts >= ?", since), ("spec_hash = ?", spec_hash)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
