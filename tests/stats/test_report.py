"""`sparkgate stats`: the table, the CSV export and the PNG charts, through stats_command."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from stats.cli import stats_command
from stats.report import format_table, plot
from stats.store import Footprint, Sample, SampleStore

T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Two models over ten minutes: `big` loads to a 30 GiB spike then serves at 20-24 GiB with a gap (stopped and
    restarted); `small` is a container at 2 GiB that sleeps at the end."""
    path = tmp_path / "stats.sqlite3"
    samples = [Sample(T0, "big", "load", pss=12.0, gpu=10.0, system_available=100.0),
               Sample(T0 + 5, "big", "load", pss=10.0, gpu=20.0, system_available=90.0)]
    samples += [Sample(T0 + 10 + 5 * i, "big", "steady", pss=4.0, gpu=16.0 + (i % 5), system_available=80.0)
                for i in range(40)]
    samples += [Sample(T0 + 400 + 5 * i, "big", "steady", pss=4.0, gpu=17.0, system_available=80.0)
                for i in range(20)]
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
                                "PEAK"]
    assert lines[1].split() == ["big", "62", "21.00", "24.00", "30.00", "30.00", "24.00", "-"]
    assert lines[2].split() == ["small", "30", "2.00", "2.00", "2.00", "-", "2.00", "0.50"]
    assert "GiB" in lines[-1]
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
