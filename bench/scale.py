#!/usr/bin/env python3
"""Scale: many concurrent streams at a realistic pace, gateway vs nginx vs direct (issue 20).

For each concurrency (default 16, 256, 1024) and each target (direct to the fake engine, nginx in front
of it, `sparkgate serve`), N streaming chat requests run at the same time, each `--tokens` tokens
(default 512) paced by the engine every `--token-delay-ms` (default 20 ms: 50 tokens/s). Per stream:
time to the first token (TTFT) and every gap between two tokens as the client saw them (ITL); errors
(HTTP status, exception, stream without [DONE], fewer tokens than asked). Per run: the CPU the proxy
and the engine used (process trees, /proc/<pid>/stat) from the first request to the last answer,
divided by N (ms of CPU per stream), the proxy's peak RSS (sum of VmRSS over its tree, sampled every
0.1 s) and the load generator's own CPU.

    .venv/bin/python bench/scale.py                                   # 16, 256, 1024 x 3 targets, ~2 min
    .venv/bin/python bench/scale.py --streams 16 --streams 256 --tokens 128   # a quick look, ~30 s
    .venv/bin/python bench/scale.py --streams 1024 --targets sparkgate,direct --client-procs 2

Processes: the engine is ../shared/bench/fake_upstream.py (`--token-delay-ms`: it sleeps that long after
each token, so a token's period is the delay plus the engine's own loop lag, which direct shows); nginx
is the shared harness's configuration (1 worker, buffering off), with worker_connections sized for N;
the gateway is `sparkgate serve` with an API key and SPARKGATE_STATS_INTERVAL=0 (bench/proxy.py's
start_gateway) over a temporary config dir routing `bench-model` to the engine (all on free ports).
The load generator is this script run with `--client` in `--client-procs` separate processes (default
one per 512 streams), each with one aiohttp session (limit=0) and uvloop; the file-descriptor limit
is raised to the hard limit. Stream starts are spread evenly over `--ramp` seconds (default 1), so
token ticks are not all in phase; TTFT counts from each stream's own start.

"ITL p99 added" is the target's ITL p99 minus direct's at the same N in the same run. A load generator
near 1.0 core per process (the `client cores` column) is itself the bottleneck and bends every figure:
add --client-procs, or read the ratios only. Everything shares this machine's cores.

Writes bench/results/scale-<date>.json (`--out`) and charts to bench/results/scale/ (`--charts`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO.parent / "shared" / "bench"
TICK = os.sysconf("SC_CLK_TCK")
CHAT = "/v1/chat/completions"
TARGETS = ("direct", "nginx", "sparkgate")

# As ../shared/bench/run_anchors.py's NGINX_CONF (1 worker, buffering off, upstream keepalive), with the
# connection and file limits sized for the run: each stream holds a client and an upstream connection.
NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {conns}; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream engine {{
    server 127.0.0.1:{upstream};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# ---------------------------------------------------------------- /proc sampling (no psutil)

def _proc_table() -> tuple[dict[int, int], dict[int, float]]:
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parent[int(d)] = int(rest[1])
            cpu[int(d)] = (int(rest[11]) + int(rest[12])) / TICK
    return parent, cpu


def tree(root: int, parent: dict[int, int]) -> list[int]:
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def tree_cpu_s(roots: list[int]) -> dict[int, float]:
    """utime+stime in seconds of each root's live process tree."""
    parent, cpu = _proc_table()
    return {r: sum(cpu.get(p, 0.0) for p in tree(r, parent)) for r in roots}


def tree_rss_mb(root: int, pids: list[int] | None = None) -> float:
    total = 0
    for p in pids if pids is not None else tree(root, _proc_table()[0]):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


class RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled every `every` s; the tree is listed once at start
    (nginx and the gateway do not fork per request)."""

    def __init__(self, root: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pids = tree(root, _proc_table()[0])
        self.every, self.peak, self.start_mb = every, 0.0, tree_rss_mb(root, self.pids)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(0, self.pids))
            self.stop.wait(self.every)

    def finish(self) -> float:
        self.stop.set()
        self.join()
        return max(self.peak, tree_rss_mb(0, self.pids))


# ---------------------------------------------------------------- the load generator (--client)

async def client(url: str, key: str, model: str, streams: int, tokens: int, start_at: float, ramp: float,
                 offset: int, total: int, timeout: float) -> dict:
    """`streams` concurrent streams; stream i (global index offset+i of total) starts at
    start_at + (offset+i) * ramp / total (wall clock, shared by all client processes)."""
    import aiohttp

    body = json.dumps({"model": model, "max_tokens": tokens, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    ttft: list[float] = []
    gaps: list[float] = []
    errors: dict[str, int] = {}
    ends: list[float] = []

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        await asyncio.sleep(max(0.0, start_at + (offset + i) * ramp / total - time.time()))
        t0 = time.perf_counter()
        my_gaps: list[float] = []
        try:
            async with s.post(url, data=body, headers=headers) as r:
                if r.status != 200:
                    await r.read()
                    return error(f"http_{r.status}")
                carry, last, n, done = b"", None, 0, False
                async for data in r.content.iter_any():
                    now = time.perf_counter()
                    buf = carry + data
                    if b"\r" in buf:
                        buf = buf.replace(b"\r\n", b"\n")
                    events = buf.split(b"\n\n")
                    carry = events.pop()
                    k = 0
                    for ev in events:
                        if b"data:" in ev:
                            if ev.rstrip().endswith(b"[DONE]"):
                                done = True
                            else:
                                k += 1
                    if not k:
                        continue
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        my_gaps.append(now - last)
                    my_gaps.extend([0.0] * (k - 1))  # tokens that came in the same read
                    last, n = now, n + k
                if not done:
                    return error("no_done")
                if n < tokens:
                    return error("short")
                gaps.extend(my_gaps)
                ends.append(time.perf_counter() - t0)
        except Exception as e:  # every failure is a counted error
            error(type(e).__name__)

    conn = aiohttp.TCPConnector(limit=0)
    to = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=to) as s:
        idle = max(0.0, start_at - time.time())  # the wait for the shared start, not busy time
        cpu0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(s, i) for i in range(streams)))
        cpu1, w1 = time.process_time(), time.perf_counter()
    return {"streams": streams, "ok": len(ends), "errors": errors,
            "durations": [round(x, 4) for x in ends], "ttft": [round(x, 6) for x in ttft],
            "gaps": [round(x, 6) for x in gaps], "cpu_s": cpu1 - cpu0, "wall_s": w1 - w0,
            "idle_s": idle, "loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}


class _RawStream(asyncio.Protocol):
    """One streaming request on its own connection, read with no HTTP client library: the response
    head is checked for 200, then every read only counts `data:` (bytes.count, in C) and is stamped.
    Why: an aiohttp client cost ~60 us of CPU per token here (0.57 cores for 256 streams at 50 tokens/s),
    so at 1024 streams it would need more than this machine's 2 cores and measure itself, not the proxy."""

    def __init__(self, request: bytes, tokens: int, done: asyncio.Future) -> None:
        self.request, self.tokens, self.done = request, tokens, done
        self.t0 = time.perf_counter()
        self.head = b""
        self.in_body = False
        self.tail = b""  # the last bytes of the body so far: "data:" and the end may straddle reads
        self.n = 0
        self.last: float | None = None
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self.got_done = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are no asyncio.Transport
        self.transport = transport
        self.t0 = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head[9:12]
            if status != b"200":
                return self._finish(f"http_{status.decode('latin-1')}")
            data, self.in_body = self.head[end + 4:], True
        # the tail can't hold a whole "data:" (5 bytes) or "[DONE]" (6) that was counted already
        k = (self.tail[-4:] + data).count(b"data:")
        if not self.got_done and b"[DONE]" in self.tail[-5:] + data:
            self.got_done, k = True, k - 1
        if k > 0:
            if self.last is None:
                self.ttft = now - self.t0
            else:
                self.gaps.append(now - self.last)
            self.gaps.extend([0.0] * (k - 1))  # tokens that came in the same read
            self.last, self.n = now, self.n + k
        self.tail = (self.tail + data)[-16:]
        if self.got_done and self.tail.endswith(b"0\r\n\r\n"):  # the last chunk of a chunked body
            self._finish("short" if self.n < self.tokens else "")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("" if self.got_done and self.n >= self.tokens else type(exc).__name__ if exc else "no_done")

    def _finish(self, error: str) -> None:
        if not self.done.done():
            self.done.set_result(error)
        if self.transport is not None:
            self.transport.close()


async def raw_client(url: str, key: str, model: str, streams: int, tokens: int, start_at: float, ramp: float,
                     offset: int, total: int, timeout: float) -> dict:
    """As `client`, with `_RawStream` instead of aiohttp."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    body = json.dumps({"model": model, "max_tokens": tokens, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
               f"Accept-Encoding: identity\r\n{auth}Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    ttft: list[float] = []
    gaps: list[float] = []
    errors: dict[str, int] = {}
    durs: list[float] = []
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        await asyncio.sleep(max(0.0, start_at + (offset + i) * ramp / total - time.time()))
        done: asyncio.Future = loop.create_future()
        proto = _RawStream(request, tokens, done)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: proto, u.hostname, u.port), timeout)
            error = await asyncio.wait_for(done, timeout)
        except Exception as e:  # every failure is a counted error
            error = type(e).__name__
            if proto.transport is not None:
                proto.transport.close()
        if error:
            errors[error] = errors.get(error, 0) + 1
            return
        ok += 1
        durs.append(time.perf_counter() - proto.t0)
        if proto.ttft is not None:
            ttft.append(proto.ttft)
        gaps.extend(proto.gaps)

    idle = max(0.0, start_at - time.time())
    cpu0, w0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    cpu1, w1 = time.process_time(), time.perf_counter()
    return {"streams": streams, "ok": ok, "errors": errors,
            "durations": [round(x, 4) for x in durs], "ttft": [round(x, 6) for x in ttft],
            "gaps": [round(x, 6) for x in gaps], "cpu_s": cpu1 - cpu0, "wall_s": w1 - w0,
            "idle_s": idle, "loop": type(loop).__module__.split(".")[0]}


def client_main(a: argparse.Namespace) -> None:
    raise_nofile()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    fn = raw_client if a.client_kind == "raw" else client
    res = runner(fn(a.url, a.api_key, a.model, a.client, a.tokens, a.start_at, a.ramp, a.offset, a.total,
                        a.timeout))
    with open(a.client_out, "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------- the runner

def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settle(pids: list[int], max_s: float = 15.0) -> None:
    """Until the watched trees use < 0.05 cores over 0.3 s (the last run's streams are gone)."""
    end = time.time() + max_s
    while time.time() < end:
        c0 = sum(tree_cpu_s(pids).values())
        time.sleep(0.3)
        if sum(tree_cpu_s(pids).values()) - c0 < 0.015:
            return


def one_run(a: argparse.Namespace, name: str, url: str, key: str, proxy_pid: int | None, up_pid: int,
            n: int, tmp: Path) -> dict:
    procs = a.client_procs or max(1, (n + 511) // 512)
    split = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.0 + 0.2 * procs  # the clients import aiohttp first
    rss = RssSampler(proxy_pid) if proxy_pid else None
    if rss:
        rss.start()
    watch = [up_pid] + ([proxy_pid] if proxy_pid else [])
    children, outs, offset = [], [], 0
    for i, k in enumerate(split):
        out = tmp / f"client-{name}-{n}-{i}.json"
        outs.append(out)
        children.append(subprocess.Popen([
            sys.executable, __file__, "--client", str(k), "--url", url, "--api-key", key, "--model", a.model,
            "--tokens", str(a.tokens), "--start-at", repr(start_at), "--ramp", str(a.ramp), "--offset",
            str(offset), "--total", str(n), "--timeout", str(a.timeout), "--client-out", str(out),
            "--client-kind", a.client_kind]))
        offset += k
    time.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = tree_cpu_s(watch), time.perf_counter()
    for c in children:
        c.wait()
    cpu1, secs = tree_cpu_s(watch), time.perf_counter() - t0
    peak = rss.finish() if rss else None
    parts = [json.loads(o.read_text()) for o in outs if o.exists()]
    ttft = [x for p in parts for x in p["ttft"]]
    gaps = [x for p in parts for x in p["gaps"]]
    durs = [x for p in parts for x in p["durations"]]
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    if len(parts) < procs:
        errors["client_failed"] = procs - len(parts)
    used = {pid: cpu1[pid] - cpu0[pid] for pid in watch}
    rec = {
        "target": name, "streams": n, "tokens": a.tokens, "token_delay_ms": a.token_delay_ms, "ramp_s": a.ramp,
        "client_procs": procs, "seconds": round(secs, 3), "ok": sum(p["ok"] for p in parts),
        "errors": sum(errors.values()), "error_kinds": errors,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "ttft_max_ms": pct(ttft, 100),
        "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99), "itl_p999_ms": pct(gaps, 99.9),
        "itl_max_ms": pct(gaps, 100), "itl_mean_ms": statistics.fmean(gaps) * 1000 if gaps else None,
        # a whole stream, first byte sent to [DONE]: the ideal is about tokens x delay
        "stream_p50_s": (pct(durs, 50) or 0) / 1000 if durs else None,
        "stream_p99_s": (pct(durs, 99) or 0) / 1000 if durs else None,
        "itl_zero_share": sum(1 for g in gaps if g == 0) / len(gaps) if gaps else None,
        "upstream_cpu_s": used[up_pid], "upstream_ms_per_stream": used[up_pid] / n * 1000,
        "proxy_cpu_s": used.get(proxy_pid) if proxy_pid else None,
        "proxy_ms_per_stream": used[proxy_pid] / n * 1000 if proxy_pid else None,
        "proxy_cores": used[proxy_pid] / secs if proxy_pid else None,
        "proxy_rss_start_mb": rss.start_mb if rss else None, "proxy_rss_peak_mb": peak,
        # each client's own CPU over its busy time (its wall time minus the wait for the start)
        "client_cores": [round(p["cpu_s"] / max(p["wall_s"] - p["idle_s"], 1e-9), 3) for p in parts],
        "client_loop": parts[0]["loop"] if parts else None, "client_kind": a.client_kind,
        # a sample of the gaps for the CDF chart (every k-th, sorted)
        "itl_cdf_ms": [round(g * 1000, 3) for g in sorted(gaps)[:: max(1, len(gaps) // 2000)]],
    }
    return rec


def start(cmd: list[str], logf: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(logf, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)


def smoke(url: str, key: str, model: str) -> str:
    """'' if a 4-token stream comes back whole."""
    import urllib.request
    req = urllib.request.Request(url, json.dumps({"model": model, "max_tokens": 4, "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}).encode(), {"Content-Type": "application/json",
                                                         **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
    except Exception as e:
        return repr(e)
    return "" if data.rstrip().endswith(b"[DONE]") and data.count(b"data:") >= 5 else f"bad stream {data[-100:]!r}"


def run_all(a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from proxy import BENCH_KEY, free_port, start_gateway, stop_gateway, wait_http

    nofile = raise_nofile()
    biggest = max(a.streams)
    if nofile < 3 * biggest + 100:
        log(f"warning: file-descriptor limit {nofile} is low for {biggest} streams (a proxy holds 2 per stream)")
    tmp = Path(tempfile.mkdtemp(prefix="sparkgate-scale-"))
    os.chmod(tmp, 0o755)  # nginx workers may run as nobody
    procs: list[subprocess.Popen] = []
    gateway = None
    targets: dict[str, tuple[str, str, int | None]] = {}
    runs: list[dict] = []
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "nofile": nofile,
            "load_avg_before": os.getloadavg(), "args": {k: v for k, v in vars(a).items() if k != "func"},
            "logs": str(tmp)}
    try:
        up_port = free_port()
        up = start([sys.executable, str(a.harness / "fake_upstream.py"), "--port", str(up_port),
                    "--token-delay-ms", str(a.token_delay_ms), "--model", a.model], tmp / "upstream.log")
        procs.append(up)
        wait_http(f"http://127.0.0.1:{up_port}/health", proc=up)
        if "direct" in a.targets:
            targets["direct"] = (f"http://127.0.0.1:{up_port}{CHAT}", "", None)
        if "nginx" in a.targets:
            nginx = next((p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if os.path.exists(p)), None)
            if nginx is None:
                log("SKIPPED nginx: no binary (apt-get install nginx-light)")
            else:
                port = free_port()
                conf = tmp / "nginx.conf"
                conf.write_text(NGINX_CONF.format(dir=tmp, upstream=up_port, port=port, conns=max(4096, 3 * biggest),
                                                  nofile=max(8192, 4 * biggest)))
                p = start([nginx, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)], tmp / "nginx.log")
                procs.append(p)
                wait_http(f"http://127.0.0.1:{port}/health", proc=p)
                meta["nginx"] = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
                targets["nginx"] = (f"http://127.0.0.1:{port}{CHAT}", "", p.pid)
        if "sparkgate" in a.targets:
            cfg = tmp / "models.d"
            cfg.mkdir()
            (cfg / "bench-model.yaml").write_text(json.dumps(
                {"name": a.model, "runtime": "external", "url": f"http://127.0.0.1:{up_port}/v1"}))
            port = free_port()
            gateway = start_gateway(cfg, port, keys=True, log=tmp / "sparkgate.log")
            targets["sparkgate"] = (f"http://127.0.0.1:{port}{CHAT}", BENCH_KEY, gateway.pid)
        for name, (url, key, _) in list(targets.items()):
            why = smoke(url, key, a.model)
            if why:
                log(f"SKIPPED {name}: {why}")
                del targets[name]
        order = [t for t in TARGETS if t in targets]
        idle = [up.pid] + [pid for _, _, pid in targets.values() if pid]
        est = sum(len(order) * (a.tokens * a.token_delay_ms / 1000 * 1.1 + a.ramp + 3) for _ in a.streams)
        log(f"{len(order)} targets x streams {a.streams}, {a.tokens} tokens every {a.token_delay_ms:g} ms "
            f"(~{est / 60:.1f} min); logs in {tmp}")
        for n in a.streams:
            for name in order:
                url, key, pid = targets[name]
                settle(idle)
                rec = one_run(a, name, url, key, pid, up.pid, n, tmp)
                runs.append(rec)
                log(f"{name:<9} N={n:<5} ok {rec['ok']} err {rec['errors']} {rec['error_kinds'] or ''} "
                    f"ttft p50/p99 {fmt(rec['ttft_p50_ms'])}/{fmt(rec['ttft_p99_ms'])} ms "
                    f"itl p50/p99 {fmt(rec['itl_p50_ms'])}/{fmt(rec['itl_p99_ms'])} ms "
                    f"stream p99 {fmt(rec['stream_p99_s'])} s "
                    f"proxy {fmt(rec['proxy_ms_per_stream'])} ms/stream rss {fmt(rec['proxy_rss_peak_mb'], 0)} MB "
                    f"clients {rec['client_cores']}")
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    meta["load_avg_after"] = os.getloadavg()
    for rec in runs:  # ITL p99 added: against direct at the same N
        d = next((r for r in runs if r["target"] == "direct" and r["streams"] == rec["streams"]), None)
        rec["itl_p99_added_ms"] = (rec["itl_p99_ms"] - d["itl_p99_ms"]
                                   if d and rec["itl_p99_ms"] is not None and d["itl_p99_ms"] is not None else None)
        rec["ttft_p50_added_ms"] = (rec["ttft_p50_ms"] - d["ttft_p50_ms"]
                                    if d and rec["ttft_p50_ms"] is not None and d["ttft_p50_ms"] is not None else None)
    return {"meta": meta, "runs": runs}


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(res: dict) -> str:
    a = res["meta"]["args"]
    lines = [f"### Scale: {a['tokens']} tokens per stream, one every {a['token_delay_ms']:g} ms, starts over "
             f"{a['ramp']:g} s ({res['meta']['cpus']} cores shared by load generator, proxy and engine)", "",
             "| target | streams | errors | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL p99 added ms "
             "| proxy CPU ms/stream | proxy cores | proxy RSS MB (start / peak) | engine ms/stream | load gen cores |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in res["runs"]:
        rss = ("-" if r["proxy_rss_peak_mb"] is None
               else f"{r['proxy_rss_start_mb']:.0f} / {r['proxy_rss_peak_mb']:.0f}")
        lines.append(
            f"| {r['target']} | {r['streams']} | {r['errors']} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} "
            f"| {fmt(r['itl_p50_ms'])} | {fmt(r['itl_p99_ms'])} | {fmt(r['itl_p99_added_ms'], 2)} "
            f"| {fmt(r['proxy_ms_per_stream'])} | {fmt(r['proxy_cores'])} | {rss} "
            f"| {fmt(r['upstream_ms_per_stream'])} | {' + '.join(f'{c:.2f}' for c in r['client_cores'])} |")
    return "\n".join(lines)


def charts(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runs = res["runs"]
    a = res["meta"]["args"]
    note = f"{a['tokens']} tokens at {1000 / a['token_delay_ms']:g} tokens/s per stream" if a["token_delay_ms"] else ""
    names = [t for t in TARGETS if any(r["target"] == t for r in runs)]
    written = []

    def line_chart(fields: list[tuple[str, str]], ylabel: str, title: str, fname: str,
                   only: list[str] | None = None, logy: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, name in enumerate(names):
            if only and name not in only:
                continue
            rs = sorted((r for r in runs if r["target"] == name), key=lambda r: r["streams"])
            for field, style in fields:
                ys = [r[field] if r[field] is not None else float("nan") for r in rs]
                label = name if len(fields) == 1 else f"{name} {field.split('_')[1]}"
                ax.plot([r["streams"] for r in rs], ys, style, color=f"C{i}", marker="o", label=label)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{note}" if note else title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)

    line_chart([("ttft_p50_ms", "-"), ("ttft_p99_ms", "--")], "TTFT, ms", "Time to first token", "ttft.png",
               logy=True)
    line_chart([("itl_p99_added_ms", "-")], "ms", "Inter-token latency p99 added vs direct", "itl_added.png",
               only=["nginx", "sparkgate"])
    line_chart([("proxy_ms_per_stream", "-")], "CPU ms per stream", "Proxy CPU per stream", "cpu.png",
               only=["nginx", "sparkgate"])
    line_chart([("proxy_rss_peak_mb", "-")], "MB", "Proxy peak RSS (process tree)", "rss.png",
               only=["nginx", "sparkgate"])
    # ITL distribution at the largest N, per target
    big = max(r["streams"] for r in runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        r = next((r for r in runs if r["target"] == name and r["streams"] == big), None)
        if r and r["itl_cdf_ms"]:
            xs = r["itl_cdf_ms"]
            ax.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], color=f"C{i}", label=name)
    ax.set_xlabel("gap between tokens, ms")
    ax.set_ylabel("share of gaps")
    ax.set_title(f"Inter-token gaps at {big} streams (CDF)" + (f"\n{note}" if note else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "itl_cdf.png", dpi=120)
    plt.close(fig)
    written.append(out / "itl_cdf.png")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, action="append", default=None,
                    help="concurrent streams, repeatable (default 16, 256, 1024)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of direct,nginx,sparkgate")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per stream (default 512)")
    ap.add_argument("--token-delay-ms", type=float, default=20.0, help="engine's delay per token (default 20)")
    ap.add_argument("--ramp", type=float, default=1.0, help="stream starts spread over this many seconds (default 1)")
    ap.add_argument("--client-procs", type=int, default=0, help="load generator processes (default: 1 per 512)")
    ap.add_argument("--client-kind", choices=("raw", "aiohttp"), default="raw",
                    help="load generator: raw asyncio protocol (default, cheap) or aiohttp")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="per stream, s (raw: whole stream; aiohttp: connect, silence)")
    ap.add_argument("--model", default="bench-model")
    ap.add_argument("--harness", type=Path, default=HARNESS, help=f"where fake_upstream.py is (default {HARNESS})")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default bench/results/scale-<date>.json)")
    ap.add_argument("--charts", type=Path, default=REPO / "bench" / "results" / "scale",
                    help="chart directory (default bench/results/scale); 'none' for no charts")
    # the load generator's own mode (one client process; set by the runner)
    ap.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--api-key", default="", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--client-out", help=argparse.SUPPRESS)
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="no runs: print the table and draw the charts of an earlier run's JSON")
    a = ap.parse_args()
    if a.client:
        return client_main(a)
    if a.replot:
        res = json.loads(a.replot.read_text())
        print(table(res))
        for p in charts(res, a.charts):
            print(p)
        return
    a.streams = a.streams or [16, 256, 1024]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if unknown := set(a.targets) - set(TARGETS):
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    res = run_all(a)
    out = a.out or REPO / "bench" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    print(f"\nAll runs: {out}")
    if res["runs"] and str(a.charts) != "none":
        for p in charts(res, a.charts):
            print(p)


if __name__ == "__main__":
    main()
