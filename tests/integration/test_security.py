"""Keys, admin, limits and CORS through a running gateway."""

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web

from gateway.cli import main as cli
from tests.harness import fake_engine_spec, run_gateway, serve_app, write_models

KEYS = [{"key": "sk-laptop-123", "name": "laptop", "models": ["small*"]},
        {"key": "sk-server-456", "name": "server"}]


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [], "max_tokens": 1}


async def test_keys_gate_requests_and_models(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("small-one"), fake_engine_spec("big-one"))
    async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
        url = gw.v1 + "/chat/completions"
        missing = await client.post(url, json=chat("small-one"))
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await client.post(url, json=chat("small-one"), headers={"Authorization": "Bearer nope-nope"})
        assert wrong.status_code == 401
        laptop = {"Authorization": "Bearer sk-laptop-123"}
        assert (await client.post(url, json=chat("small-one"), headers=laptop)).status_code == 200
        denied = await client.post(url, json=chat("big-one"), headers=laptop)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
        assert gw.starts("big-one") == 0

        listing = (await client.get(gw.v1 + "/models", headers=laptop)).json()
        assert [m["id"] for m in listing["data"]] == ["small-one"]  # big-one is hidden from this key
        assert (await client.get(gw.v1 + "/models/big-one", headers=laptop)).status_code == 404
        assert (await client.get(gw.v1 + "/models")).status_code == 401

        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-server-456", max_retries=0)
        assert sorted([m.id async for m in sdk.models.list()]) == ["big-one", "small-one"]
        reply = await sdk.chat.completions.create(model="big-one", messages=[], max_tokens=2)
        assert reply.choices[0].message.content == " t0 t1"
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=gw.v1, api_key="bad-key-000", max_retries=0).models.list()


async def test_client_key_never_reaches_the_engine_which_gets_its_own(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []

    async def chat_handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_handler)
    async with serve_app(app) as port:
        models = write_models(tmp_path, {"name": "remote", "runtime": "external", "url": f"http://127.0.0.1:{port}/v1",
                                         "api_key": "engine-own-key"})
        async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(gw.v1 + "/chat/completions", json=chat("remote"),
                                     headers={"Authorization": "Bearer sk-server-456", "X-Api-Key": "sk-server-456"})
            assert resp.status_code == 200
    assert seen[0]["Authorization"] == "Bearer engine-own-key"
    assert "sk-server-456" not in json.dumps(seen)


async def test_admin_routes_need_the_admin_key(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, api_keys=KEYS, admin_key="admin-secret-1") as gw, \
            httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(gw.url + "/admin/state")).status_code == 401
        client_key = await client.get(gw.url + "/admin/state", headers={"Authorization": "Bearer sk-server-456"})
        assert client_key.status_code == 401 and client_key.json()["error"]["code"] == "admin_key_required"
        state = await client.get(gw.url + "/admin/state", headers={"Authorization": "Bearer admin-secret-1"})
        assert state.status_code == 200
        assert state.json()["models"][0]["name"] == "m"
        assert state.json()["nodes"]["local"]["capacity_gb"] == 120


async def test_oversized_headers_get_431(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, max_header_bytes=2048) as gw, httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json=chat("m"), headers={"X-Junk": "j" * 4000})
        assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"
        assert gw.starts("m") == 0


async def test_per_model_concurrency_limit_queues_then_refuses(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("narrow", "--token-delay", "0.1", max_concurrent=1,
                                                     max_waiting=1))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "narrow", "messages": [], "max_tokens": 5}
        await client.post(gw.v1 + "/chat/completions", json={**body, "max_tokens": 1})  # warm
        results = await asyncio.gather(*(client.post(gw.v1 + "/chat/completions", json=body) for _ in range(3)))
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 429]  # one runs, one waits for the slot, one is refused
        refused = next(r for r in results if r.status_code == 429)
        assert "max_concurrent" in refused.json()["error"]["message"]


async def test_request_timeout_gives_504(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("slow", "--token-delay", "0.5"))
    async with run_gateway(models, request_timeout=1.0) as gw, httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "slow", "messages": [], "max_tokens": 10})
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "request_timeout"


async def test_cors_preflight_for_a_browser_client(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, cors_origins=["http://webui.local"]) as gw, httpx.AsyncClient(timeout=30) as client:
        resp = await client.options(gw.v1 + "/chat/completions", headers={
            "Origin": "http://webui.local", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "http://webui.local"
        other = await client.options(gw.v1 + "/chat/completions", headers={
            "Origin": "http://evil.local", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    assert cli(["serve", "--config-dir", str(models), "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to serve 0.0.0.0 without API keys" in capsys.readouterr().err


async def test_logs_carry_neither_prompts_nor_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"), fake_engine_spec("crashy", "--exit-at-start", "1"))
    caplog.set_level("DEBUG")
    async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
        headers = {"Authorization": "Bearer sk-server-456"}
        secret_prompt = "my-very-private-prompt-4711"
        for model in ("m", "crashy"):
            await client.post(gw.v1 + "/chat/completions", headers=headers, json={
                "model": model, "messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 1})
        await client.post(gw.v1 + "/chat/completions", headers={"Authorization": "Bearer sk-wrong-999"},
                          json={"model": "m", "messages": [{"role": "user", "content": secret_prompt}]})
    text = caplog.text
    assert "transition" in text  # events were logged...
    assert secret_prompt not in text and "sk-server-456" not in text and "sk-wrong-999" not in text
