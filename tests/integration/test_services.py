"""Services beside the LLMs (issue 19): a ComfyUI stand-in (tests/fake_service.py) behind the gateway under
/services/<name>/, over HTTP and over a real WebSocket client, woken on demand, held by open connections, scoped
by keys and sharing one memory budget with the models (gateway/services.py)."""

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.harness import Gateway, fake_engine_spec, run_gateway, write_models
from tests.integration.test_budget import ledger_high_water
from waker.state import ModelState

FAKE_SERVICE = str(Path(__file__).resolve().parents[1] / "fake_service.py")
NODE_100 = {"local": {"total_gb": 100, "reserve_gb": 0, "memory_probe": "none"}}
KEYS = [{"key": "sk-images-1", "name": "images", "models": ["comfy"]},
        {"key": "sk-chat-12", "name": "chat", "models": ["llm*"]}]


def service_spec(name: str = "comfy", *flags: str, **fields: Any) -> dict[str, Any]:
    """A models.d entry that runs tests/fake_service.py as a process, as `engine: service`."""
    return {"name": name, "engine": "service",
            "command": [sys.executable, FAKE_SERVICE, "--port", "{port}", *flags],
            "health_path": "/system_stats", "start_timeout": "20s", "stop_timeout": "5s", "min_uptime": 0, **fields}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ws_url(gw: Gateway, path: str) -> str:
    return gw.url.replace("http://", "ws://") + path


async def messages_until_done(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """The JSON messages of one prompt, up to ComfyUI's "done" (`executing` with node null)."""
    seen = []
    while True:
        message = await asyncio.wait_for(ws.receive_json(), 20)
        seen.append(message)
        if message["type"] == "executing" and message["data"]["node"] is None:
            return seen


def transitions(gw: Gateway, model: str) -> list[str]:
    return [e.target for e in gw.waker.events.recent(model) if e.kind == "transition"]


async def test_a_websocket_starts_the_service_and_relays_its_progress_in_order_both_ways(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy", "--steps", "6"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session, \
            httpx.AsyncClient(timeout=30) as client:
        assert gw.waker.controller("comfy").state is ModelState.STOPPED
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws?clientId=c1")) as ws:
            # The first connection started it, and was opened once it was up.
            assert gw.starts("comfy") == 1
            assert gw.waker.controller("comfy").state is ModelState.READY
            status = await ws.receive_json()
            assert status == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c1"}}
            queued = await client.post(gw.url + "/services/comfy/prompt",
                                       json={"prompt": {"3": {"class_type": "KSampler"}}, "client_id": "c1"})
            assert queued.status_code == 200
            prompt_id = queued.json()["prompt_id"]
            seen = await messages_until_done(ws)
            assert [m["type"] for m in seen] == ["execution_start", *["progress"] * 6, "executed", "executing"]
            assert [(m["data"]["value"], m["data"]["max"]) for m in seen if m["type"] == "progress"] == \
                [(n, 6) for n in range(1, 7)]
            assert all(m["data"]["prompt_id"] == prompt_id for m in seen)
            # Frames from the client reach the service, text and binary.
            await ws.send_json({"type": "echo", "data": {"n": 1}})
            assert await asyncio.wait_for(ws.receive_json(), 10) == {"type": "echo", "data": {"n": 1}}
            await ws.send_bytes(b"\x89PNG-preview")
            assert await asyncio.wait_for(ws.receive_bytes(), 10) == b"\x00\x00\x00\x01\x89PNG-preview"
        history = await client.get(gw.url + f"/services/comfy/history/{prompt_id}")
        assert history.json()[prompt_id]["status"] == {"completed": True}
        stats = (await client.get(gw.url + "/services/comfy/stats")).json()
        assert stats["sockets_opened"] == 1
        assert gw.starts("comfy") == 1  # one start for the socket and every request after it
        # The requests are counted like a model's, by their status: all answered, none taken for a client that left.
        for _ in range(20):
            assert (await client.get(gw.url + "/services/comfy/system_stats")).status_code == 200
        metrics = (await client.get(gw.url + "/metrics")).text
        assert 'sparkgate_requests_total{key="anonymous",model="comfy",status="200"} 23.0' in metrics
        assert 'status="client_gone"' not in metrics


async def test_an_open_websocket_holds_the_service_and_closing_it_lets_it_stop_when_idle(tmp_path: Path) -> None:
    # A prompt of 12 steps of 0.1 s runs well past the 0.5 s idle_timeout while the socket is open.
    models = write_models(tmp_path, service_spec("comfy", "--steps", "12", "--step-delay", "0.1",
                                                 idle_timeout="0.5s"))
    async with run_gateway(models, reap_interval=0.05) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws?clientId=c1")) as ws:
            await ws.receive_json()
            async with session.post(gw.url + "/services/comfy/prompt", json={"prompt": {}, "client_id": "c1"}) as r:
                assert r.status == 200
            await messages_until_done(ws)
            # Idle past its idle_timeout by the clock (no request for 1.2 s), yet held: the socket is in flight.
            assert gw.waker.clock.now() - controller.last_used >= 0.5
            assert controller.in_flight == 1
            await gw.waker.reap_once()
            assert controller.state is ModelState.READY
            assert not [e for e in gw.waker.events.recent("comfy") if e.kind == "idle_stop"]
        # Closed: nothing holds it, and it stops once idle.
        stop = await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.kind == "idle_stop", 10)
        assert "(idle_timeout 500ms)" in stop.reason
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "stopped", 10)
        assert controller.in_flight == 0
        # The next connection wakes it again.
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws")) as ws:
            assert (await ws.receive_json())["type"] == "status"
        assert gw.starts("comfy") == 2


async def test_http_under_the_prefix_reaches_the_service_with_any_method_path_and_query(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy", aliases=["images"]),
                          fake_engine_spec("llm", memory_gb=1))
    async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
        key = bearer("sk-images-1")
        # Cold: the first request starts it and waits for it. (From the gateway's own page: its Origin passes the door.)
        queued = await client.post(gw.url + "/services/comfy/prompt", json={"prompt": {}},
                                   headers={**key, "Origin": gw.url})
        assert queued.status_code == 200 and "prompt_id" in queued.json()
        assert gw.starts("comfy") == 1
        # What the service saw: no gateway key, no Origin, where it is mounted.
        seen = (await client.get(gw.url + "/services/images/stats", headers=key)).json()  # an alias leads there too
        headers = {k.lower(): v for k, v in seen["last_prompt_headers"].items()}
        assert "authorization" not in headers and "origin" not in headers
        assert headers["x-forwarded-prefix"] == "/services/comfy"
        bad = await client.post(gw.url + "/services/comfy/prompt", json={"nothing": 1}, headers=key)
        assert bad.status_code == 400 and bad.json() == {"error": "no prompt", "node_errors": []}  # the service's own
        # A large download streams through whole; a multipart upload goes up whole.
        size = 5 * 1024 * 1024 + 7
        image = await client.get(gw.url + "/services/comfy/view?filename=x.png&size=" + str(size), headers=key)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content == (bytes(range(256)) * 256 * 81)[:size]
        upload = await client.post(gw.url + "/services/comfy/upload/image", headers=key,
                                   files={"image": ("in.png", b"\x89PNG" + b"x" * 300_000, "image/png")})
        assert upload.json() == {"name": "in.png", "subfolder": "", "type": "input", "size": 300_004}
        # The bare prefix sends a browser to the UI's own path; the UI's page comes from the service.
        bare = await client.get(gw.url + "/services/comfy?x=1", headers=key)
        assert bare.status_code == 307 and bare.headers["location"] == "/services/comfy/?x=1"
        page = await client.get(gw.url + "/services/comfy/", headers=key)
        assert page.status_code == 200 and "fake ComfyUI" in page.text
        # Not services: an unknown name, a model; a path that climbs out is refused before anything is sent.
        assert (await client.get(gw.url + "/services/nope/", headers=key)).json()["error"]["code"] == \
            "service_not_found"
        llm = await client.get(gw.url + "/services/llm/", headers=bearer("sk-chat-12"))
        assert llm.status_code == 404 and gw.starts("llm") == 0
        climbing = await client.get(gw.url + "/services/comfy/a/%2e%2e/stats", headers=key)
        assert climbing.status_code == 400 and climbing.json()["error"]["code"] == "invalid_path"


async def test_a_key_without_the_service_in_its_scope_gets_403_and_nothing_starts(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"), fake_engine_spec("llm", memory_gb=1))
    async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client, \
            aiohttp.ClientSession() as session:
        refused = await client.post(gw.url + "/services/comfy/prompt", json={"prompt": {}},
                                    headers=bearer("sk-chat-12"))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "service_not_allowed"
        anonymous = await client.get(gw.url + "/services/comfy/system_stats")
        assert anonymous.status_code == 401
        for headers, status in ((bearer("sk-chat-12"), 403), ({}, 401), (bearer("sk-wrong-key"), 401)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
                await session.ws_connect(ws_url(gw, "/services/comfy/ws"), headers=headers)
            assert handshake.value.status == status
        # A page elsewhere can open a WebSocket to any host: its Origin is refused, key or not.
        with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
            await session.ws_connect(ws_url(gw, "/services/comfy/ws"), headers=bearer("sk-images-1"),
                                     origin="http://evil.example")
        assert foreign.value.status == 403
        assert gw.starts("comfy") == 0
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws"), headers=bearer("sk-images-1")) as ws:
            assert (await ws.receive_json())["type"] == "status"
        assert gw.starts("comfy") == 1


async def test_a_service_evicts_an_idle_llm_and_the_next_chat_wakes_the_llm_evicting_the_idle_service(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("llm", memory_gb=70, idle_timeout=0),
                          service_spec("comfy", memory_gb=40, idle_timeout=0))
    chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with run_gateway(models, nodes=NODE_100) as gw, httpx.AsyncClient(timeout=60) as client, \
            aiohttp.ClientSession() as session:
        assert (await client.post(gw.v1 + "/chat/completions", json=chat)).status_code == 200
        assert gw.waker.controller("llm").state is ModelState.READY
        # 70 + 40 > 100: the image job's connection evicts the idle LLM.
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws?clientId=c1")) as ws:
            await ws.receive_json()
            assert gw.waker.controller("llm").state is ModelState.STOPPED
            evicted = [e for e in gw.waker.events.recent("llm") if e.kind == "evict"]
            assert len(evicted) == 1 and "making room for comfy" in evicted[0].reason
            queued = await client.post(gw.url + "/services/comfy/prompt", json={"prompt": {}, "client_id": "c1"})
            assert queued.status_code == 200
            assert [m["type"] for m in await messages_until_done(ws)][-2:] == ["executed", "executing"]
        # The service is idle now: the next chat wakes the LLM, evicting it.
        reply = await client.post(gw.v1 + "/chat/completions", json=chat)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        assert gw.waker.controller("comfy").state is ModelState.STOPPED
        evicted = [e for e in gw.waker.events.recent("comfy") if e.kind == "evict"]
        assert len(evicted) == 1 and "making room for llm" in evicted[0].reason
        assert gw.starts("llm") == 2 and gw.starts("comfy") == 1
        assert ledger_high_water(gw, {"llm": 70, "comfy": 40}) <= 100


async def test_an_open_websocket_is_never_evicted_and_a_chat_that_needs_its_memory_is_told_why(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("llm", memory_gb=70), service_spec("comfy", memory_gb=40))
    chat = {"model": "llm", "messages": [], "max_tokens": 2}
    async with run_gateway(models, nodes=NODE_100, max_wait=1.0, max_hold=0) as gw, \
            httpx.AsyncClient(timeout=60) as client, aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws?clientId=c1")) as ws:
            await ws.receive_json()
            late = await client.post(gw.v1 + "/chat/completions", json=chat)
            assert late.status_code == 503
            error = late.json()["error"]
            assert error["code"] == "no_room"
            assert "held by comfy (40 GB, 1 in flight)" in error["message"]
            # The connection was left alone all along, and still works.
            await ws.send_json({"type": "echo", "data": "still here"})
            assert (await asyncio.wait_for(ws.receive_json(), 10))["data"] == "still here"
            assert "stopping" not in transitions(gw, "comfy")
        # Once it closes, the chat gets the room.
        assert (await client.post(gw.v1 + "/chat/completions", json=chat)).status_code == 200
        assert gw.waker.controller("comfy").state is ModelState.STOPPED


async def test_a_client_that_leaves_while_the_service_starts_holds_nothing_and_sends_nothing(tmp_path: Path) -> None:
    # /system_stats (its readiness route) answers 503 for its first second: a cold start that takes a while.
    models = write_models(tmp_path, service_spec("comfy", "--ready-after", "1"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        with pytest.raises(TimeoutError):  # a WebSocket client that gives up on the handshake
            await asyncio.wait_for(session.ws_connect(ws_url(gw, "/services/comfy/ws")), 0.3)
        with pytest.raises(TimeoutError):  # an HTTP client that gives up on its answer
            async with session.post(gw.url + "/services/comfy/prompt", json={"prompt": {}},
                                    timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "ready", 20)
        # Both left long before it was up: nothing counts in flight or waiting, and neither reached the service.
        assert controller.in_flight == 0 and controller.waiting == 0
        async with session.get(gw.url + "/services/comfy/stats") as resp:
            stats = await resp.json()
        assert "/prompt" not in stats["requests"] and stats["sockets_opened"] == 0


async def test_a_service_that_stops_closes_its_websockets_and_holds_nothing_after(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws")) as ws:
            await ws.receive_json()
            assert controller.in_flight == 1
            await gw.waker.stop("comfy", "asked to stop")
            closed = await asyncio.wait_for(ws.receive(), 10)
            assert closed.type is aiohttp.WSMsgType.CLOSE and ws.close_code in (1001, 1011)
        assert controller.state is ModelState.STOPPED
        for _ in range(100):  # the relay gives its lease back just after telling the client
            if controller.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert controller.in_flight == 0


async def test_a_service_is_no_model_it_is_not_listed_and_a_v1_request_naming_it_starts_nothing(tmp_path: Path) -> None:
    """A chat client offered "comfyui" as a model would start it (evicting an LLM) for an error: the list leaves
    services out and a /v1 request naming one is answered 404 at once."""
    models = write_models(tmp_path, service_spec("comfy", aliases=["images"]), fake_engine_spec("llm", memory_gb=1))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        listed = (await client.get(gw.v1 + "/models")).json()["data"]
        assert [m["id"] for m in listed] == ["llm"]
        for name in ("comfy", "images"):
            answer = await client.post(gw.v1 + "/chat/completions", json={"model": name, "messages": []})
            assert answer.status_code == 404
            assert answer.json()["error"]["message"].endswith("a service, not a model: reach it under /services/comfy/")
        assert gw.starts("comfy") == 0


async def test_a_keyless_gateway_lets_a_services_own_page_upload_a_form(tmp_path: Path) -> None:
    """ComfyUI's UI works only through a keyless (loopback) gateway, and uploads its images as forms from the
    gateway's origin: the door lets that through; a foreign page, or a form with no Origin, is still refused."""
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        files = {"image": ("in.png", b"\x89PNG" + b"x" * 1000, "image/png")}
        own = await client.post(gw.url + "/services/comfy/upload/image", files=files, headers={"Origin": gw.url})
        assert own.status_code == 200 and own.json()["size"] == 1004
        foreign = await client.post(gw.url + "/services/comfy/upload/image", files=files,
                                    headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        bare = await client.post(gw.url + "/services/comfy/upload/image", files=files)
        assert bare.status_code == 403 and bare.json()["error"]["code"] == "json_required"
