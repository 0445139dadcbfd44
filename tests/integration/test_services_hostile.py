"""Services under hostile or unlucky clients and services (gateway/services.py): clients that leave mid-handshake, a
service that refuses or never answers a WebSocket, one that crashes under an open one, odd HTTP requests. Whatever
happens, the client gets an answer or a close, and nothing stays held (the controller's in_flight goes back to 0)."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from tests.harness import fake_engine_spec, run_gateway, write_models
from tests.integration.test_services import service_spec, ws_url
from waker.lifecycle.controller import ModelController


async def released(controller: ModelController) -> int:
    """The controller's in_flight once the relay has had its moment to give its lease back (at most 5 s)."""
    for _ in range(500):
        if controller.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    return controller.in_flight


async def test_a_client_that_leaves_while_the_service_never_answers_the_websocket_handshake_holds_nothing(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        with pytest.raises(TimeoutError):  # the service is up, but its /hang never answers the handshake
            await asyncio.wait_for(session.ws_connect(ws_url(gw, "/services/comfy/hang")), 3)
        async with session.get(gw.url + "/services/comfy/stats") as resp:
            assert (await resp.json())["requests"]["/hang"] == 1  # the handshake did reach the service
        assert await released(controller) == 0


async def test_a_websocket_the_service_refuses_gets_its_status_and_holds_nothing(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gw, "/services/comfy/no-such-socket"))
        assert refused.value.status == 404
        assert await released(controller) == 0


async def test_a_service_that_crashes_under_an_open_websocket_closes_it_and_holds_nothing(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws")) as ws:
            await ws.receive_json()
            assert controller.in_flight == 1
            async with session.post(gw.url + "/services/comfy/crash") as crashed:
                assert crashed.status == 502
            closed = await asyncio.wait_for(ws.receive(), 10)
            assert closed.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1011
        assert await released(controller) == 0


async def test_many_and_large_frames_both_ways_arrive_whole_and_in_order(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws"), max_msg_size=0) as ws:
            await ws.receive_json()
            big = bytes(range(256)) * (3 * 4096)  # 3 MiB each way (the service's own limit is 4 MiB)
            await ws.send_bytes(big)
            assert await asyncio.wait_for(ws.receive_bytes(), 20) == b"\x00\x00\x00\x01" + big
            for n in range(300):
                await ws.send_json({"type": "echo", "data": n})
            assert [(await asyncio.wait_for(ws.receive_json(), 10))["data"] for _ in range(300)] == list(range(300))


async def test_head_expect_continue_and_a_chunked_upload_are_forwarded(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        head = await client.head(gw.url + "/services/comfy/")
        assert head.status_code == 200 and head.content == b""

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: sent chunked
            yield b'{"prompt": '
            await asyncio.sleep(0.05)
            yield b'{}}'

        queued = await client.post(gw.url + "/services/comfy/prompt", content=chunks(),
                                   headers={"Content-Type": "application/json", "Origin": gw.url})
        assert queued.status_code == 200 and "prompt_id" in queued.json()
        expecting = await client.post(gw.url + "/services/comfy/prompt", json={"prompt": {}},
                                      headers={"Expect": "100-continue"})
        assert expecting.status_code == 200 and "prompt_id" in expecting.json()
        seen = (await client.get(gw.url + "/services/comfy/stats")).json()
        assert "expect" not in {k.lower() for k in seen["last_prompt_headers"]}
        assert gw.waker.controller("comfy").in_flight == 0


async def test_a_websocket_handshake_the_service_never_answers_gets_504_after_upstream_read_timeout(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"))
    async with run_gateway(models, upstream_read_timeout=1.0) as gw, aiohttp.ClientSession() as session:
        controller = gw.waker.controller("comfy")
        with pytest.raises(aiohttp.WSServerHandshakeError) as silent:
            await asyncio.wait_for(session.ws_connect(ws_url(gw, "/services/comfy/hang")), 20)
        assert silent.value.status == 504
        assert await released(controller) == 0


async def test_a_reload_that_removes_the_service_leaves_an_open_websocket_alone_then_stops_it(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy"), fake_engine_spec("llm", memory_gb=1))
    async with run_gateway(models) as gw, aiohttp.ClientSession() as session, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        controller = gw.waker.controller("comfy")
        async with session.ws_connect(ws_url(gw, "/services/comfy/ws")) as ws:
            await ws.receive_json()
            (models / "comfy.yaml").unlink()
            report = (await client.post("/admin/reload")).json()
            assert report["removed"] == ["comfy"]
            await ws.send_json({"type": "echo", "data": "after the reload"})
            assert (await asyncio.wait_for(ws.receive_json(), 10))["data"] == "after the reload"
            gone = await client.get("/services/comfy/system_stats")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "service_not_found"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url(gw, "/services/comfy/ws"))
            assert refused.value.status == 404
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "stopped", 15)
        assert await released(controller) == 0


async def test_a_reload_that_removes_the_service_while_a_request_waits_for_its_start_answers_it(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy", "--ready-after", "2"), fake_engine_spec("llm", memory_gb=1))
    async with run_gateway(models) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        controller = gw.waker.controller("comfy")
        waiting = asyncio.create_task(client.get("/services/comfy/system_stats"))
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "starting", 10)
        (models / "comfy.yaml").unlink()
        assert (await client.post("/admin/reload")).json()["removed"] == ["comfy"]
        answer = await asyncio.wait_for(waiting, 25)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "stopped", 15)
        assert await released(controller) == 0


async def test_a_client_that_leaves_mid_upload_while_the_service_starts_sends_nothing_and_holds_nothing(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy", "--ready-after", "1.5"))
    async with run_gateway(models) as gw:
        controller = gw.waker.controller("comfy")
        _, writer = await asyncio.open_connection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
        # A chunked upload: its first chunk, then more (the rest never comes: the client gives up).
        writer.write(b"POST /services/comfy/prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n")
        await writer.drain()
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "starting", 10)
        writer.write(b"4\r\nmpt\"\r\n")
        await writer.drain()
        writer.close()
        await gw.waker.events.wait_for(lambda e: e.model == "comfy" and e.target == "ready", 20)
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/services/comfy/stats") as resp:
            stats = await resp.json()
        assert "/prompt" not in stats["requests"]
        assert await released(controller) == 0 and controller.waiting == 0


async def test_chunked_uploads_sent_while_the_service_starts_reach_it_whole(tmp_path: Path) -> None:
    models = write_models(tmp_path, service_spec("comfy", "--ready-after", "1"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:

        async def upload(filler: int) -> httpx.Response:
            async def chunks() -> AsyncIterator[bytes]:  # chunked, some of it sent while the service starts
                yield b'{"prompt": {}, "filler": "'
                for _ in range(filler // 65536):
                    yield b"x" * 65536
                    await asyncio.sleep(0)
                yield b'"}'
            return await client.post(gw.url + "/services/comfy/prompt", content=chunks(),
                                     headers={"Content-Type": "application/json", "Origin": gw.url})

        small, large = await asyncio.gather(upload(65536), upload(3 * 1024 * 1024))  # under and over the read-ahead
        assert small.status_code == 200 and "prompt_id" in small.json()
        assert large.status_code == 200 and "prompt_id" in large.json()
        assert gw.starts("comfy") == 1 and gw.waker.controller("comfy").in_flight == 0
