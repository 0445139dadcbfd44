"""``sparkgate stats [--since 1d] [--csv FILE]`` and ``sparkgate stats plot [--out DIR] [--since 1d]``.

Reads the store the gateway's sampler writes (WAL mode: safe while the gateway runs). Never creates a database: a
missing file means the gateway has not sampled yet, which is said, not hidden behind an empty table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stats.report import export_csv, format_table, plot
from stats.store import SampleStore, StoreUnavailable
from waker.config.durations import parse_duration


def stats_command(argv: list[str], db_path: Path, *, now: float | None = None) -> int:
    """Run ``sparkgate stats ...`` with ``argv`` the words after "stats"; returns the exit code (0 done, 1 no samples,
    2 bad arguments)."""
    parser = argparse.ArgumentParser(prog="sparkgate stats", description="per-model memory footprints")
    parser.add_argument("--since", help="only samples this recent: 90m, 1d, 2h30m (default: all)")
    parser.add_argument("--db", type=Path, default=db_path, help=f"samples database (default: {db_path})")
    plotting = bool(argv) and argv[0] == "plot"
    if plotting:
        parser.prog += " plot"
        parser.add_argument("--out", type=Path, default=Path("stats-plots"), help="folder for the PNG files")
    else:
        parser.add_argument("--csv", type=Path, help="also write every sample to this CSV file")
    try:
        args = parser.parse_args(argv[1:] if plotting else argv)
    except SystemExit as exc:  # --help, or bad arguments (argparse has printed why): an exit code, not an exit
        return exc.code if isinstance(exc.code, int) else 2
    since = None
    if args.since:
        try:
            since = (time.time() if now is None else now) - parse_duration(args.since)
        except ValueError as exc:
            print(f"sparkgate stats: --since: {exc}", file=sys.stderr)
            return 2
    path = args.db.expanduser()
    if not path.exists():
        print(f"sparkgate stats: no samples yet: {path} does not exist (the gateway writes it while engines run)",
              file=sys.stderr)
        return 1
    try:
        store = SampleStore(path)
    except StoreUnavailable as exc:
        print(f"sparkgate stats: can't read the samples: {exc}", file=sys.stderr)
        return 1
    with store:
        footprints = store.footprints(since=since)
        if plotting:
            written = plot(store, args.out, since=since)
            for file in written:
                print(file)
            if not written:
                print("sparkgate stats: no samples to plot", file=sys.stderr)
                return 1
            return 0
        if footprints:
            print(format_table(footprints))
        else:
            print("no samples" + (f" in the last {args.since}" if args.since else ""))
        if args.csv is not None:
            rows = export_csv(store, args.csv, since=since)
            print(f"{rows} sample(s) written to {args.csv}")
    return 0 if footprints else 1
