"""`sparkgate stats`: the table, the CSV export and the PNG charts, through stats_command."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from stats.cli import stats_command
from stats.report import HEADROOM, format_table, peaks_figure, plot, timeline_figure, y_top
from stats.store import Drop, Footprint, Sample, SampleStore

T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Two models over ten minutes: `big` (memory_gb 28: under-declared) loads to a 30 GiB spike then serves at
    20-24 GiB with a gap (stopped and restarted); `small` (memory_gb: auto) is a container at 2 GiB that sleeps at the
    end."""
    path = tmp_path / "stats.sqlite3"
    samples = [Sample(T0, "big", "load", pss=12.0, gpu=10.0, system_available=100.0, declared_gb=28.0),
               Sample(T0 + 5, "big", "load", pss=10.0, gpu=20.0, system_available=90.0, declared_gb=28.0)]
    samples += [Sample(T0 + 10 + 5 * i, "big", "steady", pss=4.0, gpu=16.0 + (i % 5), system_available=80.0,
                       declared_gb=28.0) for i in range(40)]
    samples += [Sample(T0 + 400 + 5 * i, "big", "steady", pss=4.0, gpu=17.0, system_available=80.0,
                       declared_gb=28.0) for i in range(20)]
    samples += [Sample(T0 + 5 * i, "small", "steady", cgroup=2.0, system_available=80.0) for i in range(30)]
    samples += [Sample(T0 + 150 + 5 * i, "small", "sleep", cgroup=0.5) for i in range(5)]
    with SampleStore(path) as store:
        store.add(samples)
    return path


def test_the_table(db: Path) -> None:
    with SampleStore(db) as store:
        text = format_table(store.footprints())
    lines = text.splitlines()
    assert lines[0].split() == ["MODEL", "SAMPLES", "P50", "P95", "PEAK", "LOAD", "PEAK", "STEADY", "PEAK", "SLEEP",
                                "PEAK", "START", "DROP", "DECLARED"]
    assert lines[1].split() == ["big", "62", "21.00", "24.00", "30.00", "30.00", "24.00", "-", "-", "28.00"]
    assert lines[2].split() == ["small", "30", "2.00", "2.00", "2.00", "-", "2.00", "0.50", "-", "-"]
    assert "GiB" in lines[-1] and "DECLARED: memory_gb in models.d" in lines[-1]
    assert format_table({"x": Footprint(1, 2, 3, None, 3, 4)}).splitlines()[1].split()[-1] == "-"


def test_stats_command_prints_the_table_and_exports_csv(db: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export.csv"
    assert stats_command(["--csv", str(out)], db) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].startswith("big ")
    assert "97 sample(s) written to" in printed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 97
    assert rows[0]["model"] == "big" and rows[0]["phase"] == "load" and rows[0]["footprint_gib"] == "22.0000"


def test_stats_since_counts_back_from_now(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stats_command(["--since", "2m"], db, now=T0 + 520) == 0  # only big's second run is that recent
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["big"]
    assert lines[1].split()[1] == "20"
    assert stats_command(["--since", "1m"], db, now=T0 + 10_000) == 1
    assert "no samples in the last 1m" in capsys.readouterr().out


def test_stats_command_errors(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stats_command([], tmp_path / "missing.sqlite3") == 1
    assert "no samples yet" in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite3").exists()  # reading never creates the database
    assert stats_command(["--since", "soon"], db) == 2
    assert "not a duration" in capsys.readouterr().err
    assert stats_command(["--bogus"], db) == 2
    assert stats_command(["--help"], db) == 0
    assert stats_command(["--db", str(db)], tmp_path / "missing.sqlite3") == 0  # --db wins over the default


def test_plot_writes_png_charts(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "charts"
    assert stats_command(["plot", "--out", str(out)], db) == 0
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["memory_over_time.png", "peaks.png"]
    for png in written:
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert capsys.readouterr().out.split() == [str(out / "memory_over_time.png"), str(out / "peaks.png")]


def test_plot_with_no_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.sqlite3"
    with SampleStore(empty) as store:
        assert plot(store, tmp_path / "charts") == []
    assert stats_command(["plot", "--out", str(tmp_path / "charts")], empty) == 1
    assert "no samples to plot" in capsys.readouterr().err


def test_the_peaks_chart_puts_the_declared_memory_beside_what_was_measured(db: Path) -> None:
    plt = pyplot()
    with SampleStore(db) as store:
        footprints = store.footprints()
        store.add_drops([Drop(T0 + 600, T0 + 500, "small", "local", 100.0, 96.5, None)])
        with_drop = store.footprints()
    assert (footprints["big"].declared_gb, footprints["small"].declared_gb) == (28.0, None)
    figure = peaks_figure(plt, footprints)
    [ax] = figure.axes
    bars = {container.get_label(): [bar.get_height() for bar in container] for container in ax.containers}
    assert list(bars) == ["p95", "peak", "memory_gb (declared)"]
    assert bars["peak"] == [30.0, 2.0]
    assert bars["memory_gb (declared)"][0] == 28.0  # big peaks above what it declares: under-declared
    assert math.isnan(bars["memory_gb (declared)"][1])  # small is auto: nothing declared
    assert ax.get_ylim()[1] == pytest.approx(30.0 * HEADROOM)
    plt.close(figure)
    bars = {c.get_label(): [b.get_height() for b in c] for c in peaks_figure(plt, with_drop).axes[0].containers}
    assert math.isnan(bars["start drop (unified memory)"][0]) and bars["start drop (unified memory)"][1] == 3.5
    plt.close("all")


def test_time_series_leave_room_above_their_highest_point(db: Path) -> None:
    plt = pyplot()
    with SampleStore(db) as store:
        figure = timeline_figure(plt, store.samples(), store.footprints())
    big, small, available = figure.axes
    assert big.get_ylim() == (0, pytest.approx(30.0 * HEADROOM))  # the load spike is not on the frame
    assert small.get_ylim() == (0, pytest.approx(2.0 * HEADROOM))
    assert available.get_ylim() == (0, pytest.approx(80.0 * HEADROOM))  # one reading per round: the last
    declared = [line for line in big.get_lines() if line.get_label() == "memory_gb (declared)"]
    assert [line.get_ydata()[0] for line in declared] == [28.0]
    assert not [line for line in small.get_lines() if line.get_label() == "memory_gb (declared)"]
    plt.close(figure)
    assert y_top([]) == 1.0 and y_top([0.0]) == 1.0 and y_top([10.0, 4.0]) == pytest.approx(11.0)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
