#!/usr/bin/env python3
"""A trace of the first chunk: where the time between a streaming request and its first token goes (issue 20).

Sequential streaming chat requests (one at a time) from a raw-socket client, through `sparkgate serve`, to
../shared/bench/fake_upstream.py. The gateway runs with probes that stamp CLOCK_MONOTONIC (the same clock in every
process of the machine) at each step of the first chunk's path; the client stamps its send and the arrival of the
first token. Per request, the stages are:

    client -> gateway     the client's send() until uvicorn's protocol has the request's bytes (kernel, wake-up)
    uvicorn -> proxy      uvicorn parses the request and calls the app (the door, dispatch)
    proxy -> engine       the proxy's request path: key, body, model, gate, lease, the engine's request written
    engine                the request written until the engine's status line and headers are parsed
    head -> first byte    the answer's head parsed until the first body bytes are about to be written to the client's
                          socket (the response start through uvicorn, then the splice)
    gateway -> client     that write until the client has the first token (the send, kernel, wake-up, the client)

and the same request sent straight to the engine (direct) and through nginx, for the totals beside them. Each stage
is printed as p50 and p90 over `--requests` requests, after `--warmup` unmeasured ones.

    .venv/bin/python bench/first_chunk.py                      # 2000 requests each, ~10 s
    .venv/bin/python bench/first_chunk.py --token-delay-ms 1   # the engine paced: no burst after the first token

With `--token-delay-ms 0` the engine writes its tokens (`--tokens`, default 16) back to back: the first token's
relay then competes for the 2 cores with the engine's burst and the client. Writes
bench/results/first-chunk.json (`--out`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import BENCH_KEY, HARNESS, REPO, free_port, wait_http

STAGES = ("client -> gateway", "uvicorn -> proxy", "proxy -> engine", "engine", "head -> first byte",
          "gateway -> client")


def serve_traced(config_dir: str, port: int, out: str) -> None:
    """The gateway as `sparkgate serve` runs it (uvicorn, httptools, uvloop), with probes on the first chunk's path;
    their stamps are written to `out` at SIGTERM."""
    import asyncio

    import uvicorn
    import uvloop
    from uvicorn.protocols.http import httptools_impl

    from gateway import proxy, upstream
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    now = time.monotonic_ns
    stamps: list[dict[str, int]] = []
    current: dict[str, int] = {}

    received = httptools_impl.HttpToolsProtocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        if data.startswith(b"POST"):
            current.clear()
            current["recv"] = now()
        received(self, data)

    httptools_impl.HttpToolsProtocol.data_received = data_received  # type: ignore[method-assign]

    call = proxy.Proxy.__call__

    async def app_called(self: Any, scope: Any, receive: Any, send: Any) -> None:
        current["app"] = now()
        await call(self, scope, receive, send)
        stamps.append(dict(current))

    proxy.Proxy.__call__ = app_called  # type: ignore[method-assign]

    send = upstream.Connection.send

    async def sent(self: Any, head: bytes, body: Any) -> None:
        current["sent"] = now()  # the write is the first thing send() does
        await send(self, head, body)

    upstream.Connection.send = sent  # type: ignore[method-assign]

    headers_complete = upstream.Connection.on_headers_complete

    def on_headers_complete(self: Any) -> None:
        current["head"] = now()
        headers_complete(self)

    upstream.Connection.on_headers_complete = on_headers_complete  # type: ignore[method-assign]

    splice = upstream.Connection.splice

    def spliced(self: Any, sink: Any) -> None:
        def first(data: bytes) -> None:
            current.setdefault("first", now())  # as the write begins: the client may have the bytes before it returns
            sink(data)

        splice(self, first)

    upstream.Connection.splice = spliced  # type: ignore[method-assign]

    settings = GatewaySettings(config_dir=Path(config_dir), port=port, stats_interval=0,
                               api_keys=[{"key": BENCH_KEY, "name": "bench"}])
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools",
                                           log_level="warning", access_log=False))

    def dump(*_: Any) -> None:
        Path(out).write_text(json.dumps(stamps))
        server.should_exit = True

    signal.signal(signal.SIGTERM, dump)
    uvloop.install()
    asyncio.run(server.serve())


def request_bytes(port: int, key: str | None, tokens: int) -> bytes:
    body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": tokens}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def client(port: int, key: str | None, n: int, tokens: int) -> list[tuple[int, int]]:
    """`n` streaming requests on one keep-alive connection: (sent, first token seen) per request."""
    request = request_bytes(port, key, tokens)
    times: list[tuple[int, int]] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            buffer = b""
            sent = time.monotonic_ns()
            sock.sendall(request)
            first = 0
            while True:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit(f"port {port}: connection closed after {len(times)} requests: {buffer[:300]!r}")
                buffer += data
                if not first and b"data: {" in buffer:
                    first = time.monotonic_ns()
                if buffer.endswith(b"0\r\n\r\n") and b"[DONE]" in buffer:
                    break
            times.append((sent, first))
    return times


def percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[int(len(values) * 0.9)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--token-delay-ms", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of each request (run_anchors.py: 256)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "first-chunk.json")
    ap.add_argument("--serve-traced", nargs=3, metavar=("CONFIG_DIR", "PORT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_traced:
        serve_traced(a.serve_traced[0], int(a.serve_traced[1]), a.serve_traced[2])
        return
    engine_port, nginx_port, gateway_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="sparkgate-first-chunk-") as tmp:
        work = Path(tmp)
        try:
            procs.append(subprocess.Popen([sys.executable, str(HARNESS / "fake_upstream.py"), "--port",
                                           str(engine_port), "--token-delay-ms", str(a.token_delay_ms)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{engine_port}/health")
            (work / "models.d").mkdir()
            (work / "models.d" / "bench-model.yaml").write_text(json.dumps(
                {"name": "bench-model", "runtime": "external", "url": f"http://127.0.0.1:{engine_port}/v1"}))
            conf = work / "nginx.conf"
            conf.write_text(NGINX % {"dir": tmp, "port": nginx_port, "upstream": engine_port})
            procs.append(subprocess.Popen(["nginx", "-c", str(conf), "-p", tmp], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            stamps_file = work / "stamps.json"
            gateway = subprocess.Popen([sys.executable, __file__, "--serve-traced", str(work / "models.d"),
                                        str(gateway_port), str(stamps_file)], cwd=REPO, env=dict(os.environ))
            procs.append(gateway)
            wait_http(f"http://127.0.0.1:{gateway_port}/health", proc=gateway)
            time.sleep(0.5)
            totals: dict[str, list[float]] = {}
            for name, port, key in (("direct", engine_port, None), ("nginx", nginx_port, None),
                                    ("sparkgate", gateway_port, BENCH_KEY)):
                times = client(port, key, a.warmup + a.requests, a.tokens)[a.warmup:]
                totals[name] = [(first - sent) / 1000 for sent, first in times]
                if name == "sparkgate":
                    client_times = times
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
            stamps = json.loads(stamps_file.read_text())[a.warmup:]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
    if len(stamps) != len(client_times):
        raise SystemExit(f"{len(stamps)} traced requests for {len(client_times)} sent")
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for (sent, first), s in zip(client_times, stamps, strict=True):
        points = [sent, s["recv"], s["app"], s["sent"], s["head"], s["first"], first]
        for stage, (begin, end) in zip(STAGES, itertools.pairwise(points), strict=True):
            stages[stage].append((end - begin) / 1000)
    result: dict[str, Any] = {"requests": a.requests, "tokens": a.tokens, "token_delay_ms": a.token_delay_ms,
                              "cpus": os.cpu_count(), "totals_us": {}, "stages_us": {}}
    print(f"time to the first token, {a.requests} sequential streaming requests of {a.tokens} tokens (us): p50 / p90")
    for name, values in totals.items():
        p50, p90 = percentiles(values)
        result["totals_us"][name] = {"p50": round(p50, 1), "p90": round(p90, 1)}
        added = "" if name == "direct" else f"   added p50 {p50 - percentiles(totals['direct'])[0]:+.1f}"
        print(f"  {name:<10} {p50:8.1f} / {p90:8.1f}{added}")
    print("sparkgate's first chunk, stage by stage (us): p50 / p90")
    for stage, values in stages.items():
        p50, p90 = percentiles(values)
        result["stages_us"][stage] = {"p50": round(p50, 1), "p90": round(p90, 1)}
        print(f"  {stage:<20} {p50:8.1f} / {p90:8.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


NGINX = """\
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %(dir)s/body;
  proxy_temp_path %(dir)s/proxy;
  fastcgi_temp_path %(dir)s/fastcgi;
  uwsgi_temp_path %(dir)s/uwsgi;
  scgi_temp_path %(dir)s/scgi;
  upstream engine { server 127.0.0.1:%(upstream)d; keepalive 16; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:%(port)d;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
"""


if __name__ == "__main__":
    main()
