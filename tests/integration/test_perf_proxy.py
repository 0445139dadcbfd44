"""What the proxy's fast path must keep while it does less per request (issue 8): engine cookies stay
with the engine, a slow plain answer is still cancelled when its client leaves (the disconnect watch
starts late, not never), the time limit still holds, and a plain answer's bytes pass through whole."""

import asyncio
import contextlib
from pathlib import Path

import httpx
from aiohttp import web

from tests.harness import run_gateway, serve_app, write_models


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_engine_cookies_never_reach_another_clients_request(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        resp.set_cookie("session", "client-a-secret")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        # A host name, not an IP: aiohttp's default jar would keep this cookie for every later request.
        models = write_models(tmp_path, {"name": "remote", "runtime": "external", "url": f"http://localhost:{port}/v1"})
        async with run_gateway(models) as gw:
            for _ in range(2):  # two clients, each with its own connection
                async with httpx.AsyncClient(timeout=30) as client:
                    resp = await client.post(gw.v1 + "/chat/completions", json=chat("remote"))
                    assert resp.status_code == 200
                    assert "client-a-secret" in resp.headers["set-cookie"]  # passed through to its client
    assert seen == [None, None]


async def test_client_leaving_a_slow_plain_request_cancels_it_at_the_engine(tmp_path: Path) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "slow", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models) as gw:
            async with httpx.AsyncClient(timeout=30) as client:
                request = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat("slow")))
                await asyncio.wait_for(started.wait(), 10)
                request.cancel()  # the client leaves: its connection closes
                with contextlib.suppress(asyncio.CancelledError):
                    await request
            await asyncio.wait_for(cancelled.wait(), 5)
            controller = gw.waker.controller("slow")
            for _ in range(100):
                if controller.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert controller.in_flight == 0
            async with httpx.AsyncClient(timeout=30) as client:
                metrics = (await client.get(gw.url + "/metrics")).text
            assert 'sparkgate_requests_total{key="anonymous",model="slow",status="client_gone"} 1.0' in metrics


async def test_time_limit_cuts_a_slow_plain_request_with_504(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application(handler_args={"handler_cancellation": True})  # the engine stops when cut off
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "slow", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models, request_timeout=0.5) as gw, httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(gw.v1 + "/chat/completions", json=chat("slow"))
            assert resp.status_code == 504 and resp.json()["error"]["code"] == "request_timeout"
            assert gw.waker.controller("slow").in_flight == 0
            metrics = (await client.get(gw.url + "/metrics")).text
            assert 'sparkgate_requests_total{key="anonymous",model="slow",status="504"} 1.0' in metrics


async def test_plain_answers_pass_through_byte_for_byte_small_and_large(tmp_path: Path) -> None:
    small = b'{"id":"x","object":"chat.completion","choices":[]}'
    large = b'{"data":"' + b"x" * (3 * 1024 * 1024) + b'"}'  # above the read-whole limit: relayed by chunks

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        return web.Response(body=large if body.get("large") else small, content_type="application/json",
                            headers={"X-Engine": "yes"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "m", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
            for body, expected in ((chat("m"), small), (chat("m", large=True), large)):
                resp = await client.post(gw.v1 + "/chat/completions", json=body)
                assert resp.status_code == 200
                assert resp.content == expected
                assert resp.headers["x-engine"] == "yes"
                assert resp.headers["content-length"] == str(len(expected))


async def test_engine_gets_json_and_no_compression_unless_the_client_says_otherwise(tmp_path: Path) -> None:
    seen: list[tuple[str | None, str | None, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Type"), request.headers.get("Accept-Encoding"),
                     request.headers.get("Authorization")))
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "m", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
            raw = b'{"model": "m", "messages": []}'
            # A bare client: no Content-Type, no Accept-Encoding (httpx sends gzip unless told otherwise).
            del client.headers["Accept-Encoding"]
            bare = await client.post(gw.v1 + "/chat/completions", content=raw,
                                     headers={"Authorization": "Bearer client-key"})
            assert bare.status_code == 200
            said = await client.post(gw.v1 + "/chat/completions", content=raw,
                                     headers={"Content-Type": "application/json; charset=utf-8",
                                              "Accept-Encoding": "br"})
            assert said.status_code == 200
    assert seen == [("application/json", "identity", None), ("application/json; charset=utf-8", "br", None)]


async def test_engine_silence_is_bounded_per_gap_not_per_request(tmp_path: Path) -> None:
    """upstream_read_timeout bounds each silence: a slow, steady stream runs longer than it; a stream that
    stops mid-way ends with a 504-shaped SSE error event one timeout after its last chunk."""

    async def handler(request: web.Request) -> web.StreamResponse:
        stall = (await request.json())["stall"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(6):
            await resp.write(f'data: {{"n": {i}}}\n\n'.encode())
            await asyncio.sleep(0.3)
            if stall and i == 2:
                await asyncio.sleep(30)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/chat/completions", handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "m", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models, upstream_read_timeout=1) as gw, httpx.AsyncClient(timeout=30) as client:
            loop = asyncio.get_running_loop()
            began = loop.time()
            steady = await client.post(gw.v1 + "/chat/completions", json=chat("m", stream=True, stall=False))
            assert steady.status_code == 200 and steady.text.endswith("data: [DONE]\n\n")
            assert loop.time() - began > 1.5  # longer than the timeout in all, never silent for 1 s
            began = loop.time()
            stalled = await client.post(gw.v1 + "/chat/completions", json=chat("m", stream=True, stall=True))
            waited = loop.time() - began
            assert stalled.status_code == 200
            assert stalled.text.count('"n":') == 3
            assert '"code": "gateway_timeout"' in stalled.text or '"code":"gateway_timeout"' in stalled.text
            assert "sent nothing for 1s" in stalled.text
            assert 1.5 <= waited < 5
