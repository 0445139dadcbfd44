"""The proxy as a hostile or awkward client meets it, over raw sockets (issue 15): only normalised paths under
`/v1/` reach an engine, headers listed in a `Connection` header stay on their hop, and a client that reads
slowly is not an engine that went silent."""

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from tests.harness import Gateway, fake_engine_spec, run_gateway, serve_app, write_models


class RawResponse:
    def __init__(self, data: bytes) -> None:
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers: list[tuple[str, str]] = []
        for line in lines:
            name, _, value = line.partition(":")
            self.headers.append((name.strip().lower(), value.strip()))
        self.body = _dechunk(body) if ("transfer-encoding", "chunked") in self.headers else body

    def header_names(self) -> set[str]:
        return {name for name, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


def request_bytes(port: int, target: bytes, payload: dict[str, Any], *headers: tuple[str, str]) -> bytes:
    """One HTTP/1.1 request exactly as given: no client library normalises the target."""
    body = json.dumps(payload).encode()
    lines = [b"POST " + target + b" HTTP/1.1", f"Host: 127.0.0.1:{port}".encode(),
             b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if not any(name.lower() == "connection" for name, _ in headers):
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def gateway_port(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


async def raw_post(gw: Gateway, target: bytes, payload: dict[str, Any], *headers: tuple[str, str],
                   timeout: float = 10) -> RawResponse:
    port = gateway_port(gw)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(port, target, payload, *headers))
        async with asyncio.timeout(timeout):
            return RawResponse(await reader.read())  # every request here ends its connection: read to the end
    finally:
        writer.close()


async def answer_or_none(gw: Gateway, target: bytes, payload: dict[str, Any]) -> RawResponse | None:
    """None when no answer came (an engine put to sleep queues completions: today's main hangs on them)."""
    try:
        return await raw_post(gw, target, payload, timeout=3)
    except TimeoutError:
        return None


# Each would reach an engine outside /v1/ once dot segments are resolved, or is not a normalised path.
REFUSED_PATHS = [
    b"/v1/../sleep", b"/v1/%2e%2e/collective_rpc", b"/v1/%2E%2E/sleep", b"/v1/.%2e/sleep", b"/v1/%2E./sleep",
    b"/v1/chat/../../sleep", b"/v1/./../sleep", b"/v1/chat/completions/../../../sleep",
    b"/v1/..%2fsleep", b"/v1/..%2Fcollective_rpc", b"/v1/..%5csleep", b"/v1/..%5Csleep", b"/v1/..\\sleep",
    b"/v1//sleep", b"/v1/chat//completions", b"/v1/", b"/v1/./chat/completions", b"/v1/%2e/chat/completions",
    b"/v1/chat/completions/..", b"/v1/chat/completions%00", b"/v1/chat%0a/completions", b"/v1/chat/completions%7F",
]


async def test_only_normalised_paths_under_v1_reach_the_engine(tmp_path: Path) -> None:
    # A vLLM engine with its unauthenticated dev routes (/sleep, /collective_rpc) at its root.
    vllm = fake_engine_spec("m", "--flavor", "vllm", "--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    models = write_models(tmp_path, vllm, fake_engine_spec("cold"))
    async with run_gateway(models) as gw:
        payload = {"model": "m", "messages": [], "max_tokens": 1, "method": "reload_weights"}
        ok = await raw_post(gw, b"/v1/chat/completions", payload)
        assert ok.status == 200 and ok.json()["choices"][0]["message"]["content"] == " t0"

        answers = {path: await answer_or_none(gw, path, payload) for path in REFUSED_PATHS}
        cold = await raw_post(gw, b"/v1/%2e%2e/sleep", {**payload, "model": "cold"})

        handle = gw.waker.controller("m").handle
        async with httpx.AsyncClient(timeout=10) as client:
            sleep_log = (await client.get(handle.root_url + "/sleep_log")).json()
        refused = {path: (r.status, r.json()["error"]["code"] if r.status == 400 else r.body[:80]) if r else "hung"
                   for path, r in answers.items()}
        # Nothing reached the engine's root routes (its /sleep_log lists every dev call).
        assert (refused, sleep_log) == (dict.fromkeys(REFUSED_PATHS, (400, "invalid_path")), [])
        assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in answers.values() if r)
        assert cold.status == 400 and gw.starts("cold") == 0  # refused before a model is started
        assert gw.waker.controller("m").state == "ready"
        again = await answer_or_none(gw, b"/v1/chat/completions", payload)
        assert again is not None and again.status == 200  # the engine was never put to sleep


async def test_upstream_url_keeps_the_path_and_query_as_sent(tmp_path: Path) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "m", "runtime": "external",
                                         "url": f"http://127.0.0.1:{port}/engine/v1"})
        async with run_gateway(models) as gw:
            plain = await raw_post(gw, b"/v1/chat/completions?api-version=2024-01&q=a%20b", {"model": "m"})
            encoded = await raw_post(gw, b"/v1/a%3Bb/x.y", {"model": "m"})
    assert (plain.status, encoded.status) == (200, 200)
    assert seen == ["/engine/v1/chat/completions?api-version=2024-01&q=a%20b", "/engine/v1/a%3Bb/x.y"]


async def test_headers_named_in_connection_stay_on_their_hop_both_ways(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append({name.lower(): value for name, value in request.headers.items()})
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []},
                                 headers={"Connection": "X-Engine-Private", "X-Engine-Private": "1",
                                          "X-Engine-Public": "1"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "m", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models) as gw:
            resp = await raw_post(gw, b"/v1/chat/completions", {"model": "m", "messages": []},
                                  ("Connection", "close, X-Secret"), ("Connection", " x-other ,"),
                                  ("X-Secret", "s3cret"), ("X-Other", "2"), ("X-Kept", "yes"))
    assert resp.status == 200
    assert seen[0]["x-kept"] == "yes" and "x-engine-public" in resp.header_names()
    # (listed client headers the engine saw, listed engine headers the client saw)
    assert ({"x-secret", "x-other"} & seen[0].keys(), {"x-engine-private"} & resp.header_names()) == (set(), set())


async def test_a_client_that_stops_reading_is_not_an_engine_that_went_silent(tmp_path: Path) -> None:
    # A stand-in engine rather than tests/fake_engine.py: its token-sized events (~180 bytes) never fill loopback's
    # socket buffers (which grow to megabytes) within a fast test, so the gateway would never wait on the client.
    silence, pause = 0.3, 1.2  # the client reads nothing for four silence timeouts while the engine streams on
    events, event = 400, b"data: " + b"x" * 16384 + b"\n\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(events):  # steadily: an event every 2 ms, as fast as the gateway takes them
            await resp.write(event)
            await asyncio.sleep(0.002)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "m", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models, upstream_read_timeout=silence) as gw:
            loop = asyncio.get_running_loop()
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: backpressure soon
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", gateway_port(gw)))
                payload = {"model": "m", "messages": [], "stream": True}
                await loop.sock_sendall(sock, request_bytes(gateway_port(gw), b"/v1/chat/completions", payload))
                await asyncio.sleep(pause)  # the behaviour under test: a client that does not read
                # The gateway waits on this client now (uvicorn paused its writes), not on the engine.
                assert any(conn.flow.write_paused for conn in gw.server.server_state.connections)
                data = bytearray()
                while chunk := await loop.sock_recv(sock, 1 << 20):
                    data += chunk
    resp = RawResponse(bytes(data))
    assert resp.status == 200
    tail = resp.body[-300:]
    assert b"sent nothing" not in tail and tail.endswith(b"\n\ndata: [DONE]\n\n"), tail
    assert resp.body.count(event) == events and len(resp.body) == len(event) * events + len(b"data: [DONE]\n\n")
