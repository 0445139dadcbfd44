#!/usr/bin/env python3
"""Profile the gateway under load: where its CPU goes per request, as top frames with percentages.

Starts ../shared/bench/fake_upstream.py on a free port and `sparkgate serve` (API key and metrics on,
as proxy.py runs it) routing `bench-model` there, drives it with ../shared/bench/load.py in one
scenario (c1: 1 client non-streaming; c64: 64 clients non-streaming; stream: 64 clients streaming
256 tokens) and samples the gateway process with one of two profilers:

* `py-spy` (default): `py-spy record` attached to the running gateway (native sampling, no
  slow-down of the profiled process). Writes the collapsed stacks (`<scenario>-py-spy.txt`, load
  into speedscope or flamegraph.pl), an SVG flame graph, and a summary of the top frames by own
  time and by inclusive time, in % of the samples where the gateway was busy.
* `pyinstrument`: the gateway runs under `python -m pyinstrument` (a statistical profiler inside the
  process; it costs some overhead) and writes its text call tree on exit.

    .venv/bin/python bench/profile.py --scenario c1 --seconds 10 --out bench/results/profile
    .venv/bin/python bench/profile.py --scenario c64 --tool pyinstrument --out bench/results/profile
    .venv/bin/python bench/profile.py --summarize bench/results/profile/c64-py-spy.txt   # tables again

Own time in a frame that writes to a socket (uvicorn's `send`, aiohttp's `_writelines`) is mostly the
kernel's: on loopback a send() runs the receiver's TCP stack and wakes it, on this CPU.

Needs the bench extra (`pip install -e '.[bench]'`: py-spy, pyinstrument). py-spy attaches with
ptrace: it needs root or CAP_SYS_PTRACE (or kernel.yama.ptrace_scope=0).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import BENCH_KEY, HARNESS, free_port, start_gateway, stop_gateway, wait_http

SCENARIOS = {
    "c1": ["--concurrency", "1"],
    "c64": ["--concurrency", "64"],
    "stream": ["--concurrency", "64", "--stream", "--max-tokens", "256"],
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`: one entry per function."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def _layer(frame: str) -> str:
    path = frame.rpartition("(")[2]
    for prefix, name in (("gateway/", "sparkgate (gateway/)"), ("waker/", "sparkgate (waker/)"),
                         ("aiohttp/", "aiohttp (upstream client)"), ("uvicorn/", "uvicorn (server)"),
                         ("prometheus_client/", "prometheus_client")):
        if path.startswith(prefix):
            return name
    if path.startswith(("asyncio/runners.py", "uvloop/")):
        return "event loop in C (uvloop: epoll, socket reads, callbacks)"
    if path.startswith("asyncio/"):
        return "asyncio (tasks, futures, timeouts)"
    return "other (stdlib: json, hashlib, fnmatch, weakref, ...)"


def summarize(collapsed: Path, top: int = 30) -> str:
    """Own-time and inclusive-time tables (in % of samples) from py-spy's raw collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]  # py-spy's --threads/--pids
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples\n"
    layers: Counter[str] = Counter()
    for frame, n in own.items():
        layers[_layer(frame)] += n
    lines = [f"{total} samples with the gateway busy (idle samples left out)", "",
             "own time by layer (the frame the CPU was in)", "   own%  layer"]
    lines += [f"{100 * c / total:7.2f}  {name}" for name, c in layers.most_common()]
    lines += ["",
             f"top {top} by own time (where the CPU is)", "   own%  function"]
    lines += [f"{100 * c / total:7.2f}  {f}" for f, c in own.most_common(top)]
    lines += ["", f"top {top} by inclusive time (own + callees)", "  incl%  function"]
    lines += [f"{100 * c / total:7.2f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def load(args: list[str], url: str, seconds: float, harness: Path) -> dict:
    cmd = [sys.executable, str(harness / "load.py"), "--url", url, "--api-key", BENCH_KEY, "--warmup", "1",
           "--duration", str(seconds), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="c1")
    ap.add_argument("--tool", choices=["py-spy", "pyinstrument"], default="py-spy")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds of load (default 10)")
    ap.add_argument("--rate", type=int, default=1000, help="py-spy samples per second (default 1000)")
    ap.add_argument("--out", type=Path, default=Path("profile"), help="output directory (default profile/)")
    ap.add_argument("--harness", type=Path, default=HARNESS, help=f"the shared bench directory (default {HARNESS})")
    ap.add_argument("--summarize", type=Path, default=None, metavar="COLLAPSED",
                    help="only print the tables for an existing py-spy raw file")
    a = ap.parse_args()
    if a.summarize:
        print(summarize(a.summarize))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    pyspy = shutil.which("py-spy", path=str(bindir)) or shutil.which("py-spy")
    if a.tool == "py-spy" and not pyspy:
        raise SystemExit("py-spy not found: pip install -e '.[bench]'")

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="sparkgate-profile-") as tmp:
        try:
            eport, gport = free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, str(a.harness / "fake_upstream.py"), "--port", str(eport)],
                                          stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{eport}/health", proc=procs[0])
            cfg = Path(tmp)
            (cfg / "bench-model.yaml").write_text(json.dumps(
                {"name": "bench-model", "runtime": "external", "url": f"http://127.0.0.1:{eport}/v1"}))
            prefix = None
            report = a.out / f"{a.scenario}-pyinstrument.txt"
            if a.tool == "pyinstrument":
                prefix = [sys.executable, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(report),
                          "-m", "gateway.cli"]
            gw = start_gateway(cfg, gport, keys=True, command=prefix)
            procs.append(gw)
            url = f"http://127.0.0.1:{gport}/v1/chat/completions"
            spy = None
            collapsed = a.out / f"{a.scenario}-py-spy.txt"
            if a.tool == "py-spy":
                # Started first, recording warm-up too (1 s of 1 + seconds): a fraction of start-up noise.
                spy = subprocess.Popen([pyspy, "record", "--pid", str(gw.pid), "--rate", str(a.rate), "--format",
                                        "raw", "--nonblocking", "--duration", str(int(a.seconds + 1)),
                                        "--output", str(collapsed)], stdout=subprocess.DEVNULL)
                time.sleep(0.5)
            result = load(SCENARIOS[a.scenario], url, a.seconds, a.harness)
            print(json.dumps(result), file=sys.stderr)
            if spy is not None:
                spy.wait(timeout=60)
        finally:
            for p in reversed(procs):
                stop_gateway(p)
    if a.tool == "py-spy":
        text = summarize(collapsed)
        summary = a.out / f"{a.scenario}-py-spy-top.txt"
        summary.write_text(f"scenario {a.scenario}: {json.dumps(result)}\n\n{text}")
        print(text)
        print(f"wrote {collapsed}, {summary}", file=sys.stderr)
    else:
        print(report.read_text() if report.exists() else f"no report at {report}")


if __name__ == "__main__":
    main()
