#!/usr/bin/env python3
"""Charts from sweep.py CSVs: one line per label (or per file when a file has no label).

Writes to --out DIR: throughput.png (output tokens/s vs concurrency), ttft.png (TTFT avg and p95
vs concurrency) and latency.png (request latency avg and p95 vs concurrency). Concurrency is on a
log2 axis.

    .venv/bin/python bench/plot.py sg.csv nginx.csv --out charts/
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """label -> rows sorted by concurrency."""
    series: dict[str, list[dict]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                label = row.get("label") or path.stem
                if label in series and series[label] and series[label][0]["_file"] != str(path):
                    label = f"{label} ({path.stem})"  # the same label in two files: keep both
                row["_file"] = str(path)
                series.setdefault(label, []).append(row)
    for rows in series.values():
        rows.sort(key=lambda r: int(r["concurrency"]))
    return series


def num(v: str) -> float:
    return float(v) if v not in ("", None) else float("nan")


def chart(series: dict[str, list[dict]], fields: list[tuple[str, str]], ylabel: str, title: str, out: Path,
          note: str = "") -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, rows) in enumerate(series.items()):
        x = [int(r["concurrency"]) for r in rows]
        color = f"C{i % 10}"
        for field, style in fields:
            name = label if len(fields) == 1 else f"{label} {field.split('_')[-2]}"
            ax.plot(x, [num(r[field]) for r in rows], style, color=color, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{note}" if note else title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", type=Path, help="sweep.py CSV files")
    ap.add_argument("--out", type=Path, default=Path("charts"), help="output directory (default charts/)")
    ap.add_argument("--note", default="", help="added to every chart's title, e.g. 'in 128 / out 128 tokens'")
    a = ap.parse_args()
    series = load(a.csv)
    if not series:
        raise SystemExit("no rows in the CSV files")
    a.out.mkdir(parents=True, exist_ok=True)
    chart(series, [("output_tokens_per_s", "-")], "output tokens/s", "Throughput vs concurrency",
          a.out / "throughput.png", a.note)
    chart(series, [("ttft_avg_ms", "-"), ("ttft_p95_ms", "--")], "TTFT, ms", "Time to first token vs concurrency",
          a.out / "ttft.png", a.note)
    chart(series, [("latency_avg_ms", "-"), ("latency_p95_ms", "--")], "request latency, ms",
          "Request latency vs concurrency", a.out / "latency.png", a.note)


if __name__ == "__main__":
    main()
