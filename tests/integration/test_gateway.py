"""The gateway end to end with engine processes (tests/fake_engine.py) on real sockets."""

import asyncio
import json
import os
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness import fake_engine_spec, run_gateway, write_models


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def engine_stats(gw, model: str) -> dict:
    handle = gw.waker.controller(model).handle
    async with httpx.AsyncClient() as client:
        return (await client.get(handle.root_url + "/stats")).json()


async def test_hundred_concurrent_requests_to_a_cold_model_cause_one_start(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("cold", "--ready-after", "0.5"))
    async with run_gateway(models) as gw:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=gw.v1, timeout=30, limits=limits) as client:
            body = {"model": "cold", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            answers = await asyncio.gather(*(client.post("/chat/completions", json=body) for _ in range(100)))
        assert [r.status_code for r in answers] == [200] * 100
        assert all(r.json()["choices"][0]["message"]["content"] == " t0 t1 t2" for r in answers)
        assert gw.starts("cold") == 1
        assert (await engine_stats(gw, "cold"))["requests"] == 100


async def test_openai_sdk_streaming_and_not_through_an_alias(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("real-name", aliases=["chat"]))
    async with run_gateway(models) as gw:
        client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content == " t0 t1 t2 t3"
        assert reply.model == "real-name"  # the engine only knows its own name: the alias was replaced
        stream = await client.chat.completions.create(
            model="real-name", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream]
        assert "".join(pieces) == " t0 t1 t2 t3 t4"
        text = await client.completions.create(model="chat", prompt="x", max_tokens=2)
        assert text.choices[0].text == " t0 t1"
        emb = await client.embeddings.create(model="chat", input=["a", "b"])
        assert len(emb.data) == 2


async def test_stream_without_done_marker_passes_through_untouched(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("nodone", "--no-done"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "nodone", "messages": [], "max_tokens": 2, "stream": True}
        resp = await client.post(gw.v1 + "/chat/completions", json=body)
        events = [line for line in resp.text.split("\n\n") if line and not line.startswith(":")]  # keep-alives
        assert len(events) == 2 and all(e.startswith("data: {") for e in events)
        assert "[DONE]" not in resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")


async def test_engine_error_status_and_body_are_kept(tmp_path: Path) -> None:
    # The engine serves another name ("--model zzz" wins) and answers our "m" with its own 404 body.
    models = write_models(tmp_path, fake_engine_spec("m", "--model", "zzz", health_path="/health"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})
        assert resp.status_code == 404
        assert resp.json() == {"error": {"message": "model 'm' not served here", "code": "model_not_found"}}


async def test_engine_that_exits_during_start_gives_503_with_exit_code_and_log_tail(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("crashy", "--exit-at-start", "3", start_timeout="60s"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "crashy", "messages": []})
        elapsed = loop.time() - began
        assert resp.status_code == 503
        error = resp.json()["error"]
        assert error["code"] == "model_start_failed"
        assert "exited with code 3 during start" in error["message"]
        assert "error: out of memory while loading weights" in error["message"]
        assert "Retry-After" in resp.headers
        assert elapsed < 30  # reported when the process exits, not at the 60 s start_timeout
        assert gw.waker.controller("crashy").state == "failed"


async def test_engine_that_never_becomes_ready_gives_503_at_start_timeout_and_is_cleaned_up(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("stuck", "--never-ready", start_timeout="1.5s"))
    async with run_gateway(models) as gw:
        pids: list[int] = []
        gw.waker.events._subscribers  # noqa: B018 - events carry no pid; read it from the handle
        async with httpx.AsyncClient(timeout=30) as client:
            request = asyncio.create_task(
                client.post(gw.v1 + "/chat/completions", json={"model": "stuck", "messages": []}))
            await gw.waker.events.wait_for(lambda e: e.target == "starting", timeout=10)
            while gw.waker.controller("stuck").handle is None:
                await asyncio.sleep(0.01)
            pids.append(gw.waker.controller("stuck").handle.pid)
            resp = await request
        assert resp.status_code == 503
        error = resp.json()["error"]
        assert error["code"] == "model_start_timeout"
        assert "did not become ready within its start_timeout of 2s" in error["message"]
        assert "fake engine stuck starting" in error["message"]
        assert not alive(pids[0])


async def test_client_disconnect_mid_stream_cancels_the_upstream_request(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("slow", "--token-delay", "0.05"))
    async with run_gateway(models) as gw:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "slow", "messages": [], "max_tokens": 1000, "stream": True}
            async with client.stream("POST", gw.v1 + "/chat/completions", json=body) as resp:
                async for piece in resp.aiter_bytes():
                    if b"data:" in piece:
                        break  # first token arrived (after the cold start's keep-alive comments): leave
        controller = gw.waker.controller("slow")
        for _ in range(200):  # the engine notices at its next write (~50 ms)
            stats = await engine_stats(gw, "slow")
            if stats["streams_cancelled"]:
                break
            await asyncio.sleep(0.02)
        assert stats["streams_cancelled"] == 1 and stats["streams_completed"] == 0
        assert controller.in_flight == 0


async def test_client_that_leaves_while_model_is_cold_releases_its_place(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("late", "--ready-after", "1"))
    async with run_gateway(models) as gw:
        async with httpx.AsyncClient(timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(gw.v1 + "/chat/completions", json={"model": "late", "messages": []})
        controller = gw.waker.controller("late")
        await gw.waker.events.wait_for(lambda e: e.target == "ready", timeout=20)
        for _ in range(100):
            if controller.waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert controller.waiting == 0 and controller.in_flight == 0


async def test_streaming_request_for_a_cold_model_gets_keepalive_comments(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("sleepy", "--ready-after", "1.2"))
    async with run_gateway(models, keepalive_interval=0.3) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "sleepy", "messages": [], "max_tokens": 2, "stream": True}
        resp = await client.post(gw.v1 + "/chat/completions", json=body)
        assert resp.status_code == 200
        assert resp.text.startswith(": waking sleepy (0s)\n\n") or resp.text.startswith(": waking sleepy")
        assert resp.text.count(": waking sleepy") >= 2
        assert resp.text.rstrip().endswith("data: [DONE]")
        # and the openai SDK reads such a stream as usual
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        await gw.waker.stop("sleepy")
        stream = await sdk.chat.completions.create(model="sleepy", messages=[], max_tokens=3, stream=True)
        assert "".join([c.choices[0].delta.content async for c in stream]) == " t0 t1 t2"


async def test_streaming_request_whose_model_fails_after_keepalives_gets_an_error_event(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("doomed", "--never-ready", start_timeout="1s"))
    async with run_gateway(models, keepalive_interval=0.2) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        stream = await sdk.chat.completions.create(model="doomed", messages=[], stream=True)
        with pytest.raises(openai.APIError, match="did not become ready"):
            async for _ in stream:
                pass


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"model": "m", "messages": [', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'{"model": 7}', 400, "missing_model"),
    (b'{"model": "nope", "messages": []}', 404, "model_not_found"),
    (b'{"model": "m", "pad": "' + b"x" * 3000 + b'"}', 413, "request_too_large"),
])
async def test_bad_input_gets_openai_errors_and_starts_nothing(
        tmp_path: Path, body: bytes, status: int, code: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, max_body_bytes=2048) as gw, httpx.AsyncClient(timeout=10) as client:
        resp = await client.post(gw.v1 + "/chat/completions", content=body,
                                 headers={"content-type": "application/json"})
        assert resp.status_code == status
        error = resp.json()["error"]
        assert error["code"] == code and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        assert gw.starts("m") == 0


async def test_oversized_chunked_body_is_refused_too(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, max_body_bytes=1024) as gw, httpx.AsyncClient(timeout=10) as client:
        async def body():
            yield b'{"model": "m", "pad": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'
        resp = await client.post(gw.v1 + "/chat/completions", content=body())
        assert resp.status_code == 413
        assert gw.starts("m") == 0


async def test_models_list_shows_every_model_and_alias_with_its_state(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("a", aliases=["brain"], memory_gb=12),
                          fake_engine_spec("b"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=10) as client:
        listing = (await client.get(gw.v1 + "/models")).json()
        assert listing["object"] == "list"
        by_id = {m["id"]: m for m in listing["data"]}
        assert set(by_id) == {"a", "brain", "b"}
        assert by_id["brain"]["alias_of"] == "a"
        assert {m["state"] for m in listing["data"]} == {"stopped"}
        assert by_id["a"]["memory_gb"] == 12
        await client.post(gw.v1 + "/chat/completions", json={"model": "brain", "messages": []})
        assert (await client.get(gw.v1 + "/models/a")).json()["state"] == "ready"
        missing = await client.get(gw.v1 + "/models/zzz")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x")
        assert sorted([m.id async for m in sdk.models.list()]) == ["a", "b", "brain"]
        assert (await client.get(gw.url + "/health")).json() == {"status": "ok"}


async def test_idle_model_is_stopped_and_restarted_on_the_next_request(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("nap", idle_timeout="1s"))
    async with run_gateway(models, reap_interval=0.1) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "nap", "messages": [], "max_tokens": 1}
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        pid = gw.waker.controller("nap").handle.pid
        stop = await gw.waker.events.wait_for(lambda e: e.kind == "idle_stop", timeout=10)
        assert "idle for 1s" in stop.reason
        await gw.waker.events.wait_for(lambda e: e.target == "stopped", timeout=10)
        assert not alive(pid)
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        assert gw.starts("nap") == 2


async def test_gateway_exit_stops_every_engine_it_started(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("a"), fake_engine_spec("b"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        for name in ("a", "b"):
            await client.post(gw.v1 + "/chat/completions", json={"model": name, "messages": []})
        pids = [gw.waker.controller(n).handle.pid for n in ("a", "b")]
        assert all(alive(p) for p in pids)
    assert not any(alive(p) for p in pids)


async def test_engine_crash_mid_stream_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("fragile", "--crash-after-tokens", "3", "--token-delay", "0.01"))
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        stream = await sdk.chat.completions.create(model="fragile", messages=[], max_tokens=50, stream=True)
        with pytest.raises(openai.APIError, match="broke off"):
            async for _ in stream:
                pass
        failed = await gw.waker.events.wait_for(lambda e: e.target == "failed", timeout=10)
        assert failed.data["exit_code"] == 137
        # the next request starts it again
        reply = await sdk.chat.completions.create(model="fragile", messages=[], max_tokens=2)
        assert reply.choices[0].message.content == " t0 t1"
        assert gw.starts("fragile") == 2


async def test_external_endpoint_is_proxied_without_lifecycle(tmp_path: Path) -> None:
    engine_models = write_models(tmp_path / "engine", fake_engine_spec("ext"))
    async with run_gateway(engine_models) as inner, httpx.AsyncClient(timeout=30) as client:
        await client.post(inner.v1 + "/chat/completions", json={"model": "ext", "messages": []})
        url = inner.waker.controller("ext").handle.api_base
        outer_models = write_models(tmp_path / "outer", {"name": "ext", "runtime": "external", "url": url})
        async with run_gateway(outer_models) as gw:
            assert gw.waker.controller("ext").state == "ready"
            resp = await client.post(gw.v1 + "/chat/completions",
                                     json={"model": "ext", "messages": [], "max_tokens": 2})
            assert resp.json()["choices"][0]["message"]["content"] == " t0 t1"
            listing = (await client.get(gw.v1 + "/models")).json()
            assert listing["data"][0]["runtime"] == "external"


async def test_unreachable_external_endpoint_gives_502(tmp_path: Path) -> None:
    models = write_models(tmp_path, {"name": "gone", "runtime": "external", "url": "http://127.0.0.1:9/v1"})
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "gone", "messages": []})
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "bad_gateway"


async def test_wrong_method_and_unknown_route_are_openai_errors(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=10) as client:
        resp = await client.get(gw.v1 + "/chat/completions")
        assert resp.status_code == 405 and "error" in resp.json()
        resp = await client.get(gw.url + "/nothing")
        assert resp.status_code == 404 and json.loads(resp.text)["error"]["code"] == "not_found"
