#!/usr/bin/env python3
"""A genai-perf-style concurrency sweep through the gateway: one CSV row per concurrency level.

Concurrency 1, 2, 4, ... up to --max-concurrency; at each level a closed loop of that many workers
sends streaming chat requests (a prompt of --input-tokens words, max_tokens = --output-tokens) for
--warmup s (not counted) then --duration s. Requests sent inside the window are measured (in-flight
ones are let finish); output tokens and completions are counted when they arrive inside the window.

Per level: TTFT avg/p95 (send -> first content token), inter-token latency avg/p95 (per request:
(latency - TTFT) / (tokens - 1), as genai-perf), request latency avg/p95, output tokens/s,
requests/s, errors. A token is an SSE event carrying a choice (delta or text); a stream that ends
without `data: [DONE]` is an error.

By default it runs standalone: it starts ../shared/bench/fake_upstream.py (--token-delay-ms) on a
free port and a gateway (`sparkgate serve`, API key on, as proxy.py does) routing `bench-model` to it.
With --direct it starts the same fake engine and measures it directly (no gateway): the reference line
for the gateway's sweep. With --url it measures that endpoint instead (a /v1 base URL, with --model and
--api-key).

    .venv/bin/python bench/sweep.py --max-concurrency 16 --duration 3 --label sparkgate --out sg.csv
    .venv/bin/python bench/sweep.py --max-concurrency 16 --duration 3 --direct --label direct --out direct.csv
    .venv/bin/python bench/sweep.py --url http://127.0.0.1:8009/v1 --model tiny-llama --label tiny --out tiny.csv
    .venv/bin/python bench/plot.py sg.csv tiny.csv --out charts/
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import BENCH_KEY, HARNESS, free_port, start_gateway, stop_gateway, wait_http

FIELDS = ["label", "concurrency", "duration_s", "input_tokens", "output_tokens", "requests", "errors",
          "requests_per_s", "output_tokens_per_s", "ttft_avg_ms", "ttft_p95_ms", "itl_avg_ms", "itl_p95_ms",
          "latency_avg_ms", "latency_p95_ms", "tokens_per_request"]


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


async def level(s: aiohttp.ClientSession, a: argparse.Namespace, url: str, payload: bytes, headers: dict,
                concurrency: int) -> dict:
    w0 = time.perf_counter() + a.warmup
    w1 = w0 + a.duration
    ttft: list[float] = []
    itl: list[float] = []
    lat: list[float] = []
    ntok: list[int] = []
    n = {"tokens": 0, "done": 0, "errors": 0}
    kinds: dict[str, int] = {}

    async def one(t0: float) -> None:
        measured = t0 >= w0
        first = None
        tokens = 0
        done = False
        async with s.post(url, data=payload, headers=headers) as r:
            if r.status != 200:
                await r.read()
                raise RuntimeError(f"http_{r.status}")
            carry = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                events = (carry + data).replace(b"\r\n", b"\n").split(b"\n\n")
                carry = events.pop()
                k = 0
                for ev in events:
                    if b"data:" not in ev:
                        continue
                    if ev.rstrip().endswith(b"[DONE]"):
                        done = True
                    elif b'"delta"' in ev or b'"text"' in ev:
                        k += 1
                if k:
                    if first is None:
                        first = now
                    tokens += k
                    if w0 <= now <= w1:
                        n["tokens"] += k
        end = time.perf_counter()
        if not done:
            raise RuntimeError("no_done")
        if w0 <= end <= w1:
            n["done"] += 1
        if measured and first is not None:
            ttft.append(first - t0)
            lat.append(end - t0)
            ntok.append(tokens)
            if tokens > 1:
                itl.append((end - first) / (tokens - 1))

    async def worker() -> None:
        while (t0 := time.perf_counter()) < w1:
            try:
                await one(t0)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if t0 >= w0:
                    n["errors"] += 1
                    kind = str(e) if isinstance(e, RuntimeError) else type(e).__name__
                    kinds[kind] = kinds.get(kind, 0) + 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    row = {"label": a.label, "concurrency": concurrency, "duration_s": a.duration, "input_tokens": a.input_tokens,
           "output_tokens": a.output_tokens, "requests": len(lat), "errors": n["errors"],
           "requests_per_s": round(n["done"] / a.duration, 2),
           "output_tokens_per_s": round(n["tokens"] / a.duration, 1),
           "ttft_avg_ms": ms(statistics.fmean(ttft)) if ttft else None, "ttft_p95_ms": ms(pct(ttft, 95)),
           "itl_avg_ms": ms(statistics.fmean(itl)) if itl else None, "itl_p95_ms": ms(pct(itl, 95)),
           "latency_avg_ms": ms(statistics.fmean(lat)) if lat else None, "latency_p95_ms": ms(pct(lat, 95)),
           "tokens_per_request": round(statistics.fmean(ntok), 1) if ntok else None}
    if kinds:
        print(f"  c={concurrency} errors: {kinds}", file=sys.stderr, flush=True)
    return row


async def sweep(a: argparse.Namespace, base: str) -> list[dict]:
    url = base.rstrip("/") + "/chat/completions"
    prompt = " ".join(f"word{i % 100}" for i in range(a.input_tokens))
    payload = json.dumps({"model": a.model, "messages": [{"role": "user", "content": prompt}],
                          "max_tokens": a.output_tokens, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"
    levels = []
    c = 1
    while c <= a.max_concurrency:
        levels.append(c)
        c *= 2
    if levels[-1] != a.max_concurrency:
        levels.append(a.max_concurrency)
    rows = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=a.timeout)) as s:
        for c in levels:
            row = await level(s, a, url, payload, headers, c)
            rows.append(row)
            print(f"c={c:<4} req/s {row['requests_per_s']:>8} tok/s {row['output_tokens_per_s']:>9} "
                  f"ttft avg {row['ttft_avg_ms']} p95 {row['ttft_p95_ms']} ms  itl avg {row['itl_avg_ms']} ms  "
                  f"lat p95 {row['latency_p95_ms']} ms  errors {row['errors']}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a /v1 base URL; default: start a gateway + fake engine here")
    ap.add_argument("--direct", action="store_true", help="start the fake engine only and measure it directly")
    ap.add_argument("--model", default="bench-model")
    ap.add_argument("--api-key", default=None, help=f"Bearer key (default: {BENCH_KEY} for the own gateway)")
    ap.add_argument("--max-concurrency", type=int, default=128)
    ap.add_argument("--input-tokens", type=int, default=128, help="prompt length in words (default 128)")
    ap.add_argument("--output-tokens", type=int, default=128, help="max_tokens (default 128)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per level (default 5)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each level (default 0.5)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--label", default="sparkgate")
    ap.add_argument("--out", type=Path, default=Path("results.csv"))
    ap.add_argument("--token-delay-ms", type=float, default=0.0, help="own fake engine: delay between tokens")
    ap.add_argument("--harness", type=Path, default=HARNESS, help=f"where fake_upstream.py is (default {HARNESS})")
    ap.add_argument("--log", type=Path, default=None, help="own gateway: write its output here")
    a = ap.parse_args()

    procs: list[subprocess.Popen] = []
    tmp = None
    try:
        if a.url:
            base, a.api_key = a.url, a.api_key or ""
        else:
            a.api_key = a.api_key if a.api_key is not None else BENCH_KEY
            eport, gport = free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, str(a.harness / "fake_upstream.py"), "--port", str(eport),
                                           "--token-delay-ms", str(a.token_delay_ms), "--model", a.model],
                                          stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{eport}/health", proc=procs[0])
            if a.direct:
                base, a.api_key = f"http://127.0.0.1:{eport}/v1", ""
            else:
                tmp = tempfile.TemporaryDirectory(prefix="sparkgate-sweep-")
                cfg = Path(tmp.name)
                (cfg / "bench-model.yaml").write_text(json.dumps(
                    {"name": a.model, "runtime": "external", "url": f"http://127.0.0.1:{eport}/v1"}))
                procs.append(start_gateway(cfg, gport, keys=True, log=a.log))
                base = f"http://127.0.0.1:{gport}/v1"
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        rows = runner(sweep(a, base))
    finally:
        for p in reversed(procs):
            stop_gateway(p)
        if tmp:
            tmp.cleanup()
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {a.out} ({len(rows)} levels)", file=sys.stderr)


if __name__ == "__main__":
    main()
