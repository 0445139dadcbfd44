#!/usr/bin/env python3
"""The proxy's engine client against aiohttp's, alone: what each costs per request (issue 20).

Starts ../shared/bench/fake_upstream.py on a free port and sends it, one at a time, plain and streaming (256 tokens)
chat requests with aiohttp's `ClientSession.post` + `readany` (the gateway's client before issue 20) and with
`gateway.upstream.Pool.request` + `readany` (its client since), alternating twice. Per kind: the time to the answer's
first body bytes (p50, p99), this process's CPU per request, and requests per second.

    .venv/bin/python bench/upstream_client.py                 # 3000 plain and 300 streaming requests per round
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import HARNESS, REPO, free_port, wait_http

sys.path.insert(0, str(REPO))
from gateway import upstream

HEADERS = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one(kind: str, session: aiohttp.ClientSession, pool: upstream.Pool, port: int, body: bytes) -> float:
    """One request, read to its end; seconds to its first body bytes."""
    began = time.perf_counter()
    if kind == "aiohttp":
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                headers={"content-type": "application/json", "accept-encoding": "identity"}) as r:
            await r.content.readany()
            first = time.perf_counter() - began
            while await r.content.readany():
                pass
        return first
    head = upstream.request_head(b"/v1/chat/completions", b"127.0.0.1:%d" % port, HEADERS, len(body))
    conn = await pool.request(("127.0.0.1", port, False), head, body)
    try:
        await conn.readany()
        first = time.perf_counter() - began
        while await conn.readany():
            pass
    finally:
        pool.release(conn)
    return first


async def run(port: int, plain_n: int) -> None:
    plain = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    stream = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                         "max_tokens": 256}).encode()
    pool = upstream.Pool(10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as session:
        for kind in ("aiohttp", "upstream", "aiohttp", "upstream"):
            for label, body, n in (("plain", plain, plain_n), ("stream", stream, plain_n // 10)):
                firsts = []
                cpu0, began = cpu(), time.perf_counter()
                for _ in range(n):
                    firsts.append(await one(kind, session, pool, port, body))
                elapsed, used = time.perf_counter() - began, cpu() - cpu0
                firsts.sort()
                print(f"{kind:9} {label:6} first bytes p50 {firsts[n // 2] * 1e6:6.0f} us  p99 "
                      f"{firsts[int(n * 0.99)] * 1e6:6.0f} us   CPU/request {used / n * 1e6:6.0f} us   "
                      f"{n / elapsed:7.0f} req/s")
    pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="plain requests per round (streams: a tenth)")
    a = ap.parse_args()
    port = free_port()
    engine = subprocess.Popen([sys.executable, str(HARNESS / "fake_upstream.py"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        uvloop.run(run(port, a.requests))
    finally:
        engine.terminate()
        engine.wait(timeout=10)


if __name__ == "__main__":
    main()
