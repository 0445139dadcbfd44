#!/usr/bin/env python3
"""Cold-start overhead of the gateway, and the thundering-herd check (one start for many requests).

A temporary models.d holds one model that runs tests/fake_engine.py as a process with
`--ready-after R` (it answers /health 503 until R s after it started). The gateway runs without API
keys (admin routes open).

1. The engine's own ready time: fake_engine.py started directly, /health polled every 5 ms until 200,
   N times: from spawn to ready (process start + imports + R).
2. N rounds of: `POST /admin/models/{m}/stop`, then a streaming request through the gateway, timed
   from send to the first body byte (TTFB); the gateway runs with keepalive_interval 0, so that a waiting stream
   gets no early 200 and comments (its first byte is the engine's). Overhead = when that first byte arrived
   minus when the engine became ready (its `X-Fake-Ready-At` header: the wall-clock moment its /health turned
   200; same machine), so spawn-time noise between runs doesn't enter it (step 1's median is only the fallback).
3. Herd: stop the model, fire --herd concurrent streaming requests at once; report the engine starts
   (`sparkgate_cold_starts_total` delta on /metrics and `transition` events to "starting" on
   `/admin/events?recent=1000`) and the complete answers. Expected: exactly 1 start, all answered.

    .venv/bin/python bench/wake.py                         # 10 rounds, ready-after 1.0 s, herd 200
    .venv/bin/python bench/wake.py --rounds 20 --ready-after 0.5 --herd 500 --json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import REPO, free_port, start_gateway, stop_gateway

FAKE_ENGINE = REPO / "tests" / "fake_engine.py"
MODEL = "wake-model"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def engine_ready_time(ready_after: float) -> float:
    """Seconds from spawning fake_engine.py until its /health answers 200 (polled every 5 ms)."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(FAKE_ENGINE), "--port", str(port), "--model", MODEL,
                             "--ready-after", str(ready_after)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except Exception:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"fake_engine exited with {proc.returncode}")
            if time.perf_counter() - t0 > 60:
                raise SystemExit("fake_engine not ready after 60 s")
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def body(max_tokens: int = 8) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}


async def stop_model(s: aiohttp.ClientSession, base: str) -> None:
    async with s.post(f"{base}/admin/models/{MODEL}/stop") as r:
        if r.status != 200:
            raise SystemExit(f"stop: HTTP {r.status}: {await r.text()}")
        await r.read()
    async with s.get(f"{base}/admin/state") as r:  # check it is really stopped
        text = await r.text()
    if '"stopped"' not in text:
        print(f"warning: after stop, state is {text[:300]}", file=sys.stderr)


async def timed_request(s: aiohttp.ClientSession, base: str) -> tuple[float, bool, float | None]:
    """(seconds from send to the first body byte, the stream ended with [DONE], seconds from the moment the
    engine became ready (its X-Fake-Ready-At header, same machine's wall clock) to that first byte)."""
    t0 = time.perf_counter()
    ttfb = late = None
    buf = b""
    async with s.post(f"{base}/v1/chat/completions", json=body()) as r:
        async for data in r.content.iter_any():
            if ttfb is None and data:
                ttfb = time.perf_counter() - t0
                ready_at = r.headers.get("X-Fake-Ready-At")
                late = time.time() - float(ready_at) if ready_at else None
            buf += data
        ok = r.status == 200 and b"[DONE]" in buf
    return (ttfb if ttfb is not None else time.perf_counter() - t0), ok, late


async def cold_starts(s: aiohttp.ClientSession, base: str) -> float:
    async with s.get(f"{base}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sparkgate_cold_starts_total{") and f'model="{MODEL}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def starting_events(s: aiohttp.ClientSession, base: str) -> list[float]:
    """Times of `transition` events to "starting" for MODEL in the recent-events snapshot."""
    times = []
    async with s.get(f"{base}/admin/events?recent=1000") as r:
        async for line in r.content:
            line = line.strip()
            if line == b": live":
                break  # the snapshot is over; the rest would be live events
            if line.startswith(b"data: "):
                ev = json.loads(line[6:])
                if ev.get("model") == MODEL and ev.get("kind") == "transition" and ev.get("target") == "starting":
                    times.append(ev["time"])
    return times


async def herd(s: aiohttp.ClientSession, base: str, n: int) -> dict:
    await stop_model(s, base)
    starts0, events0 = await cold_starts(s, base), len(await starting_events(s, base))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(timed_request(s, base) for _ in range(n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    answered = sum(1 for r in results if not isinstance(r, BaseException) and r[1])
    errors: dict[str, int] = {}
    for r in results:
        kind = type(r).__name__ if isinstance(r, BaseException) else (None if r[1] else "bad_stream")
        if kind:
            errors[kind] = errors.get(kind, 0) + 1
    ttfbs = sorted(r[0] for r in results if not isinstance(r, BaseException))
    return {"requests": n, "answered": answered, "errors": errors,
            "starts_metric": await cold_starts(s, base) - starts0,
            "starts_events": len(await starting_events(s, base)) - events0,
            "wall_s": round(wall, 3), "ttfb_p50_ms": round(pct(ttfbs, 50) * 1000, 1) if ttfbs else None,
            "ttfb_max_ms": round(ttfbs[-1] * 1000, 1) if ttfbs else None}


async def run(a: argparse.Namespace, base: str, own: float) -> dict:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await timed_request(s, base)  # first start, unmeasured (imports, page cache)
        ttfbs, lates, fails = [], [], 0
        for i in range(a.rounds):
            await stop_model(s, base)
            ttfb, ok, late = await timed_request(s, base)
            fails += not ok
            ttfbs.append(ttfb)
            if late is not None:
                lates.append(late)
            after = f"{late * 1000:.1f} ms" if late is not None else "?"
            print(f"round {i + 1}: ttfb {ttfb * 1000:.1f} ms, first byte {after} after the engine was ready"
                  f"{'' if ok else ' (FAILED)'}", file=sys.stderr, flush=True)
        h = await herd(s, base, a.herd)
    # The overhead: how long after the engine became ready its first byte reached the client (probe interval,
    # proxying). Measured per round against the engine's own clock, not against a separate run's ready time.
    over = lates or [t - own for t in ttfbs]
    return {"ready_after_s": a.ready_after, "rounds": a.rounds, "failed_rounds": fails,
            "ttfb_p50_ms": round(pct(ttfbs, 50) * 1000, 1), "ttfb_p95_ms": round(pct(ttfbs, 95) * 1000, 1),
            "overhead_p50_ms": round(pct(over, 50) * 1000, 1), "overhead_p95_ms": round(pct(over, 95) * 1000, 1),
            "overhead_mean_ms": round(statistics.fmean(over) * 1000, 1), "herd": h}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--ready-after", type=float, default=1.0, help="fake engine's load time, seconds (default 1.0)")
    ap.add_argument("--herd", type=int, default=200, help="concurrent cold requests (default 200)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    ap.add_argument("--log", type=Path, default=None, help="write the gateway's output here")
    a = ap.parse_args()

    own_times = [engine_ready_time(a.ready_after) for _ in range(a.rounds)]
    own = statistics.median(own_times)
    print(f"engine's own ready time (spawn -> /health 200, {a.rounds}x): p50 {own * 1000:.1f} ms, "
          f"min {min(own_times) * 1000:.1f}, max {max(own_times) * 1000:.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="sparkgate-wake-") as tmp:
        spec = {"name": MODEL, "engine": "generic",
                "command": [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--model", "{served_name}",
                            "--ready-after", str(a.ready_after)],
                "health_path": "/health", "idle_timeout": 0, "min_uptime": 0,
                "start_timeout": "60s", "stop_timeout": "5s"}
        cfg = Path(tmp) / "models.d"
        cfg.mkdir()
        (cfg / f"{MODEL}.yaml").write_text(yaml.safe_dump(spec))
        port = free_port()
        # No early 200 and keep-alive comments for a stream that waits (SPARKGATE_KEEPALIVE_INTERVAL=0): the first
        # byte is then the engine's, and its X-Fake-Ready-At header comes through with its status.
        gw = start_gateway(cfg, port, keys=False, log=a.log, extra_env={"SPARKGATE_KEEPALIVE_INTERVAL": "0"})
        try:
            res = asyncio.run(run(a, f"http://127.0.0.1:{port}", own))
        finally:
            stop_gateway(gw)
    res["own_ready_p50_ms"] = round(own * 1000, 1)
    h = res["herd"]
    print(f"cold TTFB through the gateway ({a.rounds} rounds): p50 {res['ttfb_p50_ms']} ms, p95 {res['ttfb_p95_ms']} ms"
          f"{', FAILED ' + str(res['failed_rounds']) if res['failed_rounds'] else ''}")
    print(f"overhead (first byte after the engine was ready): p50 {res['overhead_p50_ms']} ms, "
          f"p95 {res['overhead_p95_ms']} ms, mean {res['overhead_mean_ms']} ms")
    print(f"herd: {h['requests']} concurrent cold requests -> {h['starts_metric']:g} start(s) (metric), "
          f"{h['starts_events']} (events), {h['answered']} answered, errors {h['errors'] or 0}, "
          f"wall {h['wall_s']} s, TTFB p50 {h['ttfb_p50_ms']} ms max {h['ttfb_max_ms']} ms")
    if a.json:
        print(json.dumps(res))
    ok = (h["starts_metric"] == 1 and h["starts_events"] == 1 and h["answered"] == h["requests"]
          and not res["failed_rounds"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
