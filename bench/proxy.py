#!/usr/bin/env python3
"""Proxy overhead of the gateway: ../shared/bench/compare.py run against `sparkgate serve`.

Starts `sparkgate serve --config-dir bench/models.d --port P` as a user runs it (API keys on, metrics
on), waits for /health, runs compare.py with the gateway as target `sparkgate` (compare.py starts the
fake engine on :18200 and nginx on :18201 itself), prints its table and stops the gateway.

    .venv/bin/python bench/proxy.py                  # 3 rounds (compare.py's default)
    .venv/bin/python bench/proxy.py --rounds 1 --harness ../shared/bench
    .venv/bin/python bench/proxy.py --rounds 2 --floor --baseline /tmp/sparkgate-base   # + floor.py, + a checkout

The helpers `start_gateway` / `stop_gateway` / `free_port` are used by sweep.py and wake.py too.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO.parent / "shared" / "bench"
SPARKGATE = Path(sys.executable).parent / "sparkgate"
BENCH_KEY = "sk-bench-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 30, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"not up after {seconds:g} s: {url}")


def start_gateway(config_dir: Path, port: int, keys: bool = True, log: Path | None = None,
                  extra_env: dict[str, str] | None = None, command: list[str] | None = None,
                  cwd: Path = REPO) -> subprocess.Popen:
    """`sparkgate serve` on 127.0.0.1:port; returns once /health answers 200. `command` replaces the
    `sparkgate` executable (e.g. a profiler in front of `-m gateway.cli`); `cwd` with
    `command=[python, "-m", "gateway.cli"]` runs another checkout's code."""
    env = dict(os.environ, SPARKGATE_STATS_INTERVAL="0")
    env.pop("SPARKGATE_API_KEYS", None)
    env.pop("SPARKGATE_API_KEYS_FILE", None)
    if keys:
        env["SPARKGATE_API_KEYS"] = json.dumps([{"key": BENCH_KEY, "name": "bench"}])
    env.update(extra_env or {})
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([*(command or [str(SPARKGATE)]), "serve", "--config-dir", str(config_dir.resolve()),
                             "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    except BaseException:
        stop_gateway(proc)
        raise
    return proc


def stop_gateway(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="BENCH_ROUNDS for compare.py (its default: 3)")
    ap.add_argument("--harness", type=Path, default=HARNESS, help=f"the shared bench directory (default {HARNESS})")
    ap.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    ap.add_argument("--config-dir", type=Path, default=REPO / "bench" / "models.d")
    ap.add_argument("--log", type=Path, default=None, help="write the gateway's output here")
    ap.add_argument("--floor", action="store_true",
                    help="also measure bench/floor.py, the smallest uvicorn + aiohttp proxy (target `floor`), and "
                         "its hand-written upstream variant (`floor-raw`)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also measure the gateway from another checkout (e.g. a `git worktree` of the last "
                         "release) as target `baseline`, in the same run")
    a = ap.parse_args()
    compare = a.harness / "compare.py"
    if not compare.exists():
        raise SystemExit(f"no {compare}; pass --harness DIR")
    procs: list[subprocess.Popen] = []
    targets: list[str] = []
    env = dict(os.environ, BENCH_API_KEY=BENCH_KEY)
    if a.rounds is not None:
        env["BENCH_ROUNDS"] = str(a.rounds)
    try:
        if a.baseline is not None:
            port = free_port()
            procs.append(start_gateway(a.config_dir, port, keys=True, cwd=a.baseline.resolve(),
                                       command=[sys.executable, "-m", "gateway.cli"]))
            targets.append(f"baseline=http://127.0.0.1:{port}/v1/chat/completions")
        port = a.port or free_port()
        procs.append(start_gateway(a.config_dir, port, keys=True, log=a.log))
        targets.append(f"sparkgate=http://127.0.0.1:{port}/v1/chat/completions")
        if a.floor:
            for name, flags in (("floor", []), ("floor-raw", ["--raw"])):
                port = free_port()
                procs.append(subprocess.Popen([sys.executable, str(REPO / "bench" / "floor.py"), "--port", str(port),
                                               *flags]))
                _wait_port(port, procs[-1])  # no /health route: up once it listens
                targets.append(f"{name}=http://127.0.0.1:{port}/v1/chat/completions")
        print(f"running {compare} with {', '.join(targets)}", file=sys.stderr, flush=True)
        rc = subprocess.run([sys.executable, str(compare), *targets], env=env).returncode
    finally:
        for proc in reversed(procs):
            stop_gateway(proc)
    sys.exit(rc)


def _wait_port(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"exited with {proc.returncode} before :{port} listened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on :{port} after {seconds:g} s")


if __name__ == "__main__":
    main()
