"""What ``sparkgate stats`` shows: a footprint table, a CSV export and PNG charts.

matplotlib is optional (the ``stats`` extra) and imported only by :func:`plot`, so the gateway and the table work
without it.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from stats.store import Footprint, Sample, SampleStore


def format_table(footprints: dict[str, Footprint]) -> str:
    """One row per model, every figure in GiB: what ``memory_gb`` could be set to, and how loading compares with
    serving (a load peak far above the steady peak is what a budget of steady figures would miss)."""
    rows = [("MODEL", "SAMPLES", "P50", "P95", "PEAK", "LOAD PEAK", "STEADY PEAK", "SLEEP PEAK")]
    for model, f in footprints.items():
        rows.append((model, str(f.samples), _gib(f.p50), _gib(f.p95), _gib(f.peak), _gib(f.load_peak),
                     _gib(f.steady_peak), _gib(f.sleep_peak)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n(GiB; P50/P95/PEAK over samples while loading or ready)"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def export_csv(store: SampleStore, path: str | Path, since: float | None = None) -> int:
    """Every sample as CSV (see :meth:`SampleStore.export_csv`); returns the row count."""
    return store.export_csv(path, since=since)


def plot(store: SampleStore, out_dir: str | Path, since: float | None = None) -> list[Path]:
    """Write ``memory_over_time.png`` (each model's footprint, one panel per model, loading marked, and the
    machine's MemAvailable) and ``peaks.png`` (peak vs p95 per model) into ``out_dir``; returns the files written,
    none when there are no samples."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (headless servers, CI)
    import matplotlib.pyplot as plt

    samples = store.samples(since=since)
    footprints = store.footprints(since=since)
    if not samples or not footprints:
        return []
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_timeline(plt, samples, list(footprints), out / "memory_over_time.png"),
               _plot_peaks(plt, footprints, out / "peaks.png")]
    return written


def _plot_timeline(plt: Any, samples: list[Sample], models: list[str], path: Path) -> Path:
    # One MemAvailable reading per round, repeated in each model's sample of that round.
    system = sorted({s.ts: s.system_available for s in samples if s.system_available is not None}.items())
    panels = len(models) + (1 if system else 0)
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(11, 2.4 * panels + 0.6), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=False):
        mine = [s for s in samples if s.model == model and s.footprint is not None]
        times, values = _with_gaps([s.ts for s in mine], [s.footprint for s in mine])
        ax.plot(times, values, color="tab:blue", linewidth=1.2, label="footprint")
        for phase, color in (("load", "tab:orange"), ("sleep", "tab:gray")):
            marked = [s for s in mine if s.phase == phase]
            if marked:
                ax.scatter([_dt(s.ts) for s in marked], [s.footprint for s in marked], s=9, color=color,
                           label=phase, zorder=3)
        ax.set_ylabel("GiB")
        ax.set_title(model, loc="left", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    if system:
        ax = axes[-1, 0]
        times, values = _with_gaps([t for t, _ in system], [v for _, v in system])
        ax.plot(times, values, color="tab:green", linewidth=1.2)
        ax.set_ylabel("GiB")
        ax.set_title("MemAvailable (this machine)", loc="left", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_peaks(plt: Any, footprints: dict[str, Footprint], path: Path) -> Path:
    models = list(footprints)
    positions = range(len(models))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(models) + 2), 4))
    ax.bar([p - 0.2 for p in positions], [footprints[m].p95 for m in models], width=0.4, label="p95")
    ax.bar([p + 0.2 for p in positions], [footprints[m].peak for m in models], width=0.4, label="peak")
    ax.set_xticks(list(positions), models, rotation=20, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title("Memory per model: p95 vs peak")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _with_gaps(times: Sequence[float], values: Sequence[float | None]) -> tuple[list[datetime], list[float]]:
    """Break the line where sampling stopped (model stopped, gateway down), instead of drawing across the gap."""
    steps = [b - a for a, b in itertools.pairwise(times)]
    limit = 3 * statistics.median(steps) if steps else 0.0
    xs: list[datetime] = []
    ys: list[float] = []
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        if i and limit and t - times[i - 1] > limit:
            xs.append(_dt((t + times[i - 1]) / 2))
            ys.append(float("nan"))
        xs.append(_dt(t))
        ys.append(float("nan") if v is None else v)
    return xs, ys


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts)
