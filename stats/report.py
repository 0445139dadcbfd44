"""What ``sparkgate stats`` shows: a footprint table, a CSV export and PNG charts.

matplotlib is optional (the ``stats`` extra) and imported only by :func:`plot`, so the gateway and the table work
without it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from stats.store import Footprint, Sample, SampleStore


def format_table(footprints: dict[str, Footprint]) -> str:
    """One row per model, every figure in GiB: what ``memory_gb`` could be set to, and how loading compares with
    serving (a load peak far above the steady peak is what a budget of steady figures would miss), beside what
    models.d declares (a model whose peak passes its declared ``memory_gb`` is under-declared)."""
    rows = [("MODEL", "SAMPLES", "P50", "P95", "PEAK", "LOAD PEAK", "STEADY PEAK", "SLEEP PEAK", "START DROP",
             "DECLARED")]
    for model, f in footprints.items():
        rows.append((model, str(f.samples), _gib(f.p50), _gib(f.p95), _gib(f.peak), _gib(f.load_peak),
                     _gib(f.steady_peak), _gib(f.sleep_peak), _gib(f.drop_peak), _gib(f.declared_gb)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + (
        "\n(GiB; P50/P95/PEAK over samples while loading or ready; START DROP: MemAvailable lost over a lone start on "
        "unified memory, what it takes there; DECLARED: memory_gb in models.d, - for auto)")


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def export_csv(store: SampleStore, path: str | Path, since: float | None = None) -> int:
    """Every sample as CSV (see :meth:`SampleStore.export_csv`); returns the row count."""
    return store.export_csv(path, since=since)


HEADROOM = 1.1
"""Y axes reach 10 % above the highest value drawn: a line at the top is not hidden by the frame."""


def plot(store: SampleStore, out_dir: str | Path, since: float | None = None) -> list[Path]:
    """Write ``memory_over_time.png`` (each model's footprint, one panel per model, loading marked, its declared
    ``memory_gb`` dashed, and the machine's MemAvailable) and ``peaks.png`` (p95, peak, start drop and declared
    ``memory_gb`` per model) into ``out_dir``; returns the files written, none when there are no samples."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (headless servers, CI)
    import matplotlib.pyplot as plt

    samples = store.samples(since=since)
    footprints = store.footprints(since=since)
    if not samples or not footprints:
        return []
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for figure, name in ((timeline_figure(plt, samples, footprints), "memory_over_time.png"),
                         (peaks_figure(plt, footprints), "peaks.png")):
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        written.append(out / name)
    return written


def timeline_figure(plt: Any, samples: list[Sample], footprints: dict[str, Footprint]) -> Any:
    """The memory-over-time figure (matplotlib ``Figure``): one panel per model of ``footprints``, then the
    machine's MemAvailable."""
    # One MemAvailable reading per round, repeated in each model's sample of that round.
    system = sorted({s.ts: s.system_available for s in samples if s.system_available is not None}.items())
    panels = len(footprints) + (1 if system else 0)
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(11, 2.4 * panels + 0.6), squeeze=False)
    for ax, (model, footprint) in zip(axes[:, 0], footprints.items(), strict=False):
        mine = [s for s in samples if s.model == model and s.footprint is not None]
        times, values = _with_gaps([s.ts for s in mine], [s.footprint for s in mine])
        ax.plot(times, values, color="tab:blue", linewidth=1.2, label="footprint")
        for phase, color in (("load", "tab:orange"), ("sleep", "tab:gray")):
            marked = [s for s in mine if s.phase == phase]
            if marked:
                ax.scatter([_dt(s.ts) for s in marked], [s.footprint for s in marked], s=9, color=color,
                           label=phase, zorder=3)
        drawn = [v for v in values if not math.isnan(v)]
        for level, label, style in ((footprint.declared_gb, "memory_gb (declared)", "--"),
                                    (footprint.drop_peak, "start drop (unified memory)", ":")):
            if level is not None:
                ax.axhline(level, color="tab:red" if style == "--" else "tab:purple", linestyle=style,
                           linewidth=1.0, label=label)
                drawn.append(level)
        ax.set_ylabel("GiB")
        ax.set_title(model, loc="left", fontsize=10)
        ax.set_ylim(0, y_top(drawn))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    if system:
        ax = axes[-1, 0]
        times, values = _with_gaps([t for t, _ in system], [v for _, v in system])
        ax.plot(times, values, color="tab:green", linewidth=1.2)
        ax.set_ylabel("GiB")
        ax.set_title("MemAvailable (this machine)", loc="left", fontsize=10)
        ax.set_ylim(0, y_top([v for v in values if not math.isnan(v)]))
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def peaks_figure(plt: Any, footprints: dict[str, Footprint]) -> Any:
    """Per model: p95 and peak as sampled, the largest start drop where it was measured (unified memory), and the
    ``memory_gb`` models.d declares, side by side: a declared bar below the measured ones is under-declared (the
    budget lets in more than fits), far above them over-declared (models wait for room never used)."""
    models = list(footprints)
    series = [("p95", [footprints[m].p95 for m in models], "tab:blue"),
              ("peak", [footprints[m].peak for m in models], "tab:orange")]
    if any(footprints[m].drop_peak is not None for m in models):
        series.append(("start drop (unified memory)", [footprints[m].drop_peak for m in models], "tab:purple"))
    if any(footprints[m].declared_gb is not None for m in models):
        series.append(("memory_gb (declared)", [footprints[m].declared_gb for m in models], "tab:red"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(series) * len(models) + 3), 4))
    for i, (label, values, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([p + offset for p in range(len(models))], [math.nan if v is None else v for v in values],
               width=width, label=label, color=color, hatch="//" if label.startswith("memory_gb") else None,
               edgecolor="white" if label.startswith("memory_gb") else None)
    ax.set_xticks(list(range(len(models))), models, rotation=20, ha="right")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, y_top([v for _, values, _ in series for v in values if v is not None]))
    ax.set_title("Memory per model: measured vs declared")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def y_top(values: Sequence[float]) -> float:
    """The top of a y axis that starts at 0: :data:`HEADROOM` above the highest value (1 GiB for nothing)."""
    highest = max(values, default=0.0)
    return highest * HEADROOM if highest > 0 else 1.0


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
