"""Memory samples in SQLite, and the footprints learned from them.

Two tables, every figure in GiB (like every "GB" in sparkgate):

* ``samples``: one row per model per sampling round, what the model's own processes or container hold;
* ``drops``: one row per cold start watched on a unified-memory machine, what the whole machine lost over it
  (stats/unified.py says why and when such a row is trustworthy).

SQLite in WAL mode: the gateway's sampler writes while ``sparkgate stats`` reads the same file from another process,
and neither blocks the other. Peaks and percentiles are computed by SQLite (aggregates and window functions), not by
reading every row into Python: 90 days at one sample every 5 s is 1.5 M rows per model, and the loader asks for a
learned peak on every reload (bench/stats_peak.py measures it).

The footprint rule (one place: :func:`footprint_of`, and the same rule in SQL: ``_FOOTPRINT``): what one sample
says the model takes is

    host = max(cgroup, pss if known else rss)     (whichever of these were read)
    footprint = host + gpu                        (gpu: NVML per-process device memory; absent counts 0)

* host: containers are read through their memory cgroup, processes through PSS summed over their process group
  (RSS where PSS can't be read, which over-counts pages shared between workers: the safe side for a budget). If a
  sample had both a cgroup and a process figure, the larger is kept.
* gpu is *added*, not maxed: on discrete GPUs device memory is a separate pool that no host figure shows.
* On a unified-memory GB10, CUDA allocations are made by the driver and appear neither in a process's RSS/PSS nor
  in its memory cgroup, and NVML cannot give the per-process figure at all: a sample there shows the engine's host
  memory only, a few GB of what it takes. That is why the budget learns a unified-memory model from ``drops``
  instead (stats/learned.py); the samples still show the host side and the sleep figures.
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
from typing import Any

PHASES = ("load", "steady", "sleep")
"""load: STARTING or WAKING; steady: READY; sleep: SLEEPING."""

_FOOTPRINT = """CASE WHEN coalesce(cgroup, pss, rss, gpu) IS NULL THEN NULL ELSE
    coalesce(max(coalesce(cgroup, pss, rss), coalesce(pss, rss, cgroup)), 0) + coalesce(gpu, 0) END"""
""":func:`footprint_of` in SQL. max() of two arguments is NULL if either is: each side falls back on the other, so it
is the larger of the host figures that were read."""

_ADDED_COLUMNS = {
    "declared_gb": "declared_gb REAL",
    "footprint": f"footprint REAL GENERATED ALWAYS AS ({_FOOTPRINT}) VIRTUAL",
}
"""Columns a database written by an earlier version lacks; added when it is opened (SQLite adds virtual generated
columns to an existing table, and computes them on read)."""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS samples (
    ts REAL NOT NULL,               -- unix time
    model TEXT NOT NULL,
    phase TEXT NOT NULL,            -- load | steady | sleep
    rss REAL,                       -- GiB, summed over the process group (process runtime)
    pss REAL,                       -- GiB, likewise
    cgroup REAL,                    -- GiB, container memory cgroup minus inactive file cache (docker runtime)
    gpu REAL,                       -- GiB, NVML per-process device memory
    system_available REAL,          -- GiB, MemAvailable of the gateway's machine
    spec_hash TEXT,                 -- ModelSpec.spec_hash(): footprints of another engine config don't count
    {_ADDED_COLUMNS["declared_gb"]},               -- the entry's memory_gb when sampled; NULL for memory_gb: auto
    {_ADDED_COLUMNS["footprint"]}   -- GiB, the footprint rule (never written: computed)
);
CREATE TABLE IF NOT EXISTS drops (
    ts REAL NOT NULL,               -- unix time the watch ended
    started REAL NOT NULL,          -- unix time of the baseline reading, just before the start
    model TEXT NOT NULL,
    node TEXT NOT NULL,
    baseline REAL NOT NULL,         -- GiB, the node's MemAvailable just before the start
    lowest REAL NOT NULL,           -- GiB, its lowest MemAvailable over the load and the first minutes ready
    spec_hash TEXT
);
"""

_INDEXES = """
CREATE INDEX IF NOT EXISTS samples_model_ts ON samples (model, ts);
-- The learned peaks: max(footprint) of one model, engine configuration and phase is one seek in this index (SQLite's
-- min/max optimisation), however many samples there are.
CREATE INDEX IF NOT EXISTS samples_peak ON samples (model, spec_hash, phase, footprint);
CREATE INDEX IF NOT EXISTS drops_model_ts ON drops (model, ts);
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
    declared_gb: float | None = None  # memory_gb as models.d declared it (None: auto)

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
class Drop:
    """What a unified-memory node lost while one model started on it alone: MemAvailable just before the start
    (``baseline``) minus its lowest reading over the load and the first minutes ready (``lowest``), GiB."""

    ts: float
    started: float
    model: str
    node: str
    baseline: float
    lowest: float
    spec_hash: str | None = None

    @property
    def gib(self) -> float:
        return self.baseline - self.lowest


@dataclass(frozen=True, slots=True)
class Footprint:
    """One model's memory over a period, GiB. p50, p95 and peak are over its awake samples (load and steady): what
    it holds while it can serve; a sleeping engine's memory is ``sleep_peak``, apart. ``drop_peak``: the largest
    drop of MemAvailable over one of its starts on unified memory (what it really takes there). ``declared_gb``:
    the latest ``memory_gb`` models.d declared for it in the period (None: never declared, ``auto``)."""

    p50: float
    p95: float
    peak: float
    load_peak: float | None  # while starting or waking: vLLM's profiling run and CUDA graph capture peak here
    steady_peak: float | None  # while ready
    samples: int  # awake samples with a footprint
    sleep_peak: float | None = None
    drop_peak: float | None = None
    declared_gb: float | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on values already sorted."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    return _interpolate(dict(enumerate(sorted_values)), len(sorted_values), q)


def _ranks(count: int, q: float) -> tuple[int, int]:
    """The 0-based ranks :func:`percentile` interpolates between for ``count`` values."""
    low = math.floor((count - 1) * q / 100.0)
    return low, min(low + 1, count - 1)


def _interpolate(at_rank: dict[int, float], count: int, q: float) -> float:
    """:func:`percentile` from the values at the two ranks around ``(count - 1) * q / 100`` (0-based)."""
    low, high = _ranks(count, q)
    return at_rank[low] + (at_rank[high] - at_rank[low]) * ((count - 1) * q / 100.0 - low)


def default_db_path() -> Path:
    """``$XDG_STATE_HOME/sparkgate/stats.sqlite3`` (``~/.local/state/...``): state worth keeping across restarts, not
    a cache (the learned footprints feed ``memory_gb: auto``)."""
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sparkgate" / "stats.sqlite3"


class StoreUnavailable(Exception):
    """The stats database can't be opened (not a database, no permission, no room): statistics are optional, so the
    gateway runs without them and says why (this message)."""


_COLUMNS = ("ts", "model", "phase", "rss", "pss", "cgroup", "gpu", "system_available", "spec_hash", "declared_gb")
_DROP_COLUMNS = ("ts", "started", "model", "node", "baseline", "lowest", "spec_hash")
_PERCENTILES = (50, 95)


class SampleStore:
    """The samples and drops tables. One connection shared by threads (the sampler writes from a worker thread),
    under a lock. Raises :class:`StoreUnavailable` when the file can't be opened as a stats database."""

    def __init__(self, path: str | Path, *, timeout: float = 5.0) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last samples
            db.executescript(_SCHEMA)
            _migrate(db)
            db.executescript(_INDEXES)
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
        self._db = db

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
        self._insert("samples", _COLUMNS, rows)
        return len(rows)

    def add_drops(self, drops: Iterable[Drop]) -> int:
        rows = [tuple(getattr(d, c) for c in _DROP_COLUMNS) for d in drops]
        self._insert("drops", _DROP_COLUMNS, rows)
        return len(rows)

    def _insert(self, table: str, columns: Sequence[str], rows: list[tuple[object, ...]]) -> None:
        if rows:
            with self._lock, self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows)

    def samples(self, model: str | None = None, *, since: float | None = None,
                spec_hash: str | None = None) -> list[Sample]:
        """Samples in time order, optionally of one model, from unix time ``since``, of one engine config."""
        where, args = _filters(model, since, spec_hash)
        return [Sample(*row) for row in self._query(
            f"SELECT {', '.join(_COLUMNS)} FROM samples {where} ORDER BY ts, model", args)]

    def drops(self, model: str | None = None, *, since: float | None = None,
              spec_hash: str | None = None) -> list[Drop]:
        """Drops in time order (see :class:`Drop`), filtered like :meth:`samples`."""
        where, args = _filters(model, since, spec_hash)
        return [Drop(*row) for row in self._query(
            f"SELECT {', '.join(_DROP_COLUMNS)} FROM drops {where} ORDER BY ts, model", args)]

    def footprints(self, since: float | None = None) -> dict[str, Footprint]:
        """Every sampled model's footprint from unix time ``since`` (all time by default), by model name.

        Computed by SQLite: the maxima and counts per model, configuration and phase in one pass over the peak index;
        the percentiles from the two awake values around each one's rank (numbered by a window function).
        """
        where, args = _filters(None, since, None)
        peaks: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        for model, phase, peak, count in self._query(
                f"SELECT model, phase, max(footprint), count(footprint) FROM samples {where} "
                "GROUP BY model, spec_hash, phase", args):
            if peak is not None:
                mine = peaks.setdefault(model, {})
                mine[phase] = max(peak, mine.get(phase, peak))
                counts[model] = counts.get(model, 0) + (count if phase != "sleep" else 0)
        awake = {model: n for model, n in sorted(counts.items()) if n}  # only ever seen asleep: no awake footprint
        wanted = sorted({(model, rank) for model, n in awake.items() for q in _PERCENTILES
                         for rank in _ranks(n, q)})
        at_rank: dict[str, dict[int, float]] = {}
        if wanted:
            for model, rank, value in self._query(
                    f"""WITH wanted(model, r) AS (VALUES {', '.join('(?, ?)' for _ in wanted)})
                        SELECT model, r, footprint FROM (
                            SELECT model, footprint, row_number() OVER (PARTITION BY model ORDER BY footprint) - 1 AS r
                            FROM samples {where} AND footprint IS NOT NULL AND phase != 'sleep')
                        JOIN wanted USING (model, r)""", [*(x for pair in wanted for x in pair), *args]):
                at_rank.setdefault(model, {})[rank] = value
        declared = dict(self._query(
            f"""SELECT s.model, s.declared_gb FROM samples s JOIN (
                    SELECT model, max(ts) AS ts FROM samples {where} GROUP BY model) latest
                ON s.model = latest.model AND s.ts = latest.ts""", args))
        drops = dict(self._query(f"SELECT model, max(baseline - lowest) FROM drops {where} GROUP BY model", args))
        result = {}
        for model, count in awake.items():
            phases = peaks[model]
            load_peak, steady_peak = phases.get("load"), phases.get("steady")
            p50, p95 = (_interpolate(at_rank[model], count, q) for q in _PERCENTILES)
            result[model] = Footprint(p50=p50, p95=p95, peak=max(v for v in (load_peak, steady_peak) if v is not None),
                                      load_peak=load_peak, steady_peak=steady_peak, samples=count,
                                      sleep_peak=phases.get("sleep"), drop_peak=drops.get(model),
                                      declared_gb=declared.get(model))
        return result

    def learned_peak(self, model: str, *, spec_hash: str | None = None, since: float | None = None) -> float | None:
        """The largest awake footprint of ``model`` (GiB), or None until it has been seen READY at least once.

        Samples taken only while loading (an engine that failed or was stopped mid-start) never finished allocating:
        their peak would understate what the model needs. Once one READY sample exists, the load that led to it was
        sampled through its end. With ``spec_hash``, only samples of that engine configuration count: other flags
        (``--max-model-len``, ``gpu_memory_utilization``) mean another footprint.
        """
        where, args = _filters(model, since, spec_hash)
        [(load, steady)] = self._query(
            f"""SELECT (SELECT max(footprint) FROM samples {where} AND phase = 'load'),
                       (SELECT max(footprint) FROM samples {where} AND phase = 'steady')""", args + args)
        return None if steady is None else max(steady, load if load is not None else steady)

    def learned_sleep_peak(self, model: str, *, spec_hash: str | None = None,
                           since: float | None = None) -> float | None:
        """The largest footprint of ``model`` sampled while it was SLEEPING (GiB), or None if it never was."""
        where, args = _filters(model, since, spec_hash)
        [(peak,)] = self._query(f"SELECT max(footprint) FROM samples {where} AND phase = 'sleep'", args)
        return peak

    def learned_drop(self, model: str, *, spec_hash: str | None = None, since: float | None = None) -> float | None:
        """The largest drop of MemAvailable over one of ``model``'s starts on unified memory (GiB), or None."""
        where, args = _filters(model, since, spec_hash)
        [(peak,)] = self._query(f"SELECT max(baseline - lowest) FROM drops {where}", args)
        return peak

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
        """Delete samples and drops older than unix time ``before``; returns how many samples. Keeps the file from
        growing forever."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM drops WHERE ts < ?", (before,))
            return self._db.execute("DELETE FROM samples WHERE ts < ?", (before,)).rowcount

    def _query(self, sql: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to this schema (columns are only ever added). The first
    open of a large old file also builds the peak index: seconds, once."""
    present = {row[1] for row in db.execute("PRAGMA table_xinfo(samples)")}  # xinfo: generated columns too
    for name, definition in _ADDED_COLUMNS.items():
        if name not in present:
            db.execute(f"ALTER TABLE samples ADD COLUMN {definition}")


def _filters(model: str | None, since: float | None, spec_hash: str | None) -> tuple[str, list[object]]:
    """A WHERE clause (always one: ``WHERE 1`` when nothing is filtered, so callers may append ``AND ...``)."""
    clauses = ["1"]
    args: list[object] = []
    for clause, value in (("model = ?", model), ("ts >= ?", since), ("spec_hash = ?", spec_hash)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return "WHERE " + " AND ".join(clauses), args


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
