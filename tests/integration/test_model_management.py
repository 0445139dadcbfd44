"""Open WebUI's llama.cpp provider against a real gateway and real engine processes (tests/fake_engine.py), with the
requests it sends (backend/open_webui/routers/openai.py): the chat connection's URL ends in /v1 and is listed at
`{url}/models` for the Loaded indicator; model management calls the same URL with /v1 taken off
(`get_model_management_root_url`): `GET {root}/models`, `POST {root}/models/load` and `POST {root}/models/unload`
with `{"model": "<id>"}`, the connection's key as a Bearer token and a JSON content type (aiohttp `json=`).
Each test here failed before issue 18."""

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Gateway, fake_engine_spec, run_gateway, write_models

KEY = "sk-open-webui-0001"
ONLY_A = "sk-only-a-0001"
KEYS = [{"key": KEY, "name": "open-webui", "models": ["*"]}, {"key": ONLY_A, "name": "laptop", "models": ["a"]}]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def open_webui_loaded(model: dict[str, Any]) -> bool | None:
    """Open WebUI's Loaded indicator for a llama.cpp connection (get_provider_model_loaded_state, as its code reads)."""
    status = model.get("status")
    if isinstance(status, dict):
        if status.get("value") in ("loaded", "sleeping"):
            return True
        if status.get("value") in ("loading", "unloaded"):
            return False
    return True if "status" not in model else None


class OpenWebUI:
    """The requests of one Open WebUI connection with Provider set to llama.cpp."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str) -> None:
        self.session, self.url, self.key = session, url.rstrip("/"), key
        self.root = self.url.removesuffix("/v1")  # get_model_management_root_url
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    async def loaded(self) -> dict[str, bool | None]:
        async with self.session.get(f"{self.url}/models", headers=self.headers) as resp:
            assert resp.status == 200
            return {m["id"]: open_webui_loaded(m) for m in (await resp.json())["data"]}

    async def manage(self, operation: str, model: str) -> tuple[int, dict[str, Any]]:
        async with self.session.request("POST", f"{self.root}/models/{operation}", json={"model": model},
                                        headers=self.headers) as resp:
            return resp.status, await resp.json()

    async def chat(self, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with self.session.post(f"{self.url}/chat/completions", json=body, headers=self.headers) as resp:
            await resp.read()
            return resp.status


async def reaches(gw: Gateway, model: str, state: str) -> None:
    controller = gw.waker.controller(model)
    async with asyncio.timeout(20):
        while controller.state != state:
            await controller.changed().wait()


async def test_open_webuis_loaded_indicator_and_eject_follow_and_drive_the_real_engine(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("a"), fake_engine_spec("b"))
    async with run_gateway(models, api_keys=KEYS) as gw, aiohttp.ClientSession() as session:
        owui = OpenWebUI(session, gw.v1, KEY)
        assert await owui.loaded() == {"a": False, "b": False}
        async with session.get(f"{owui.root}/models", headers=owui.headers) as resp:  # the management panel's list
            assert resp.status == 200 and {m["id"] for m in (await resp.json())["data"]} == {"a", "b"}

        status, body = await owui.manage("load", "a")
        assert status == 200 and body["success"] is True
        await reaches(gw, "a", "ready")
        assert await owui.loaded() == {"a": True, "b": False}
        assert await owui.chat("a") == 200
        pid = gw.waker.controller("a").handle.pid
        assert alive(pid)

        status, body = await owui.manage("unload", "a")  # Eject
        assert status == 200 and body["success"] is True and body["status"] == {"value": "unloaded"}
        await reaches(gw, "a", "stopped")
        assert not alive(pid)
        assert await owui.loaded() == {"a": False, "b": False}
        assert await owui.chat("a") == 200  # the next chat starts it again
        assert gw.starts("a") == 2


async def test_eject_waits_for_no_answer_it_would_cut(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("a", "--token-delay", "0.05"))
    async with run_gateway(models, api_keys=KEYS) as gw, aiohttp.ClientSession() as session:
        owui = OpenWebUI(session, gw.v1, KEY)
        body = {"model": "a", "messages": [], "max_tokens": 20, "stream": True}
        async with session.post(f"{owui.url}/chat/completions", json=body, headers=owui.headers) as stream:
            first = b""
            while not first.startswith(b"data: "):  # past the keep-alive comments of the cold start
                first = await stream.content.readline()
            status, refused = await owui.manage("unload", "a")
            assert status == 409 and refused["error"]["code"] == "model_busy"
            rest = (await stream.read()).decode()
        chunks = [line for line in (first.decode() + rest).splitlines() if line.startswith("data: {")]
        assert len(chunks) >= 20 and rest.rstrip().endswith("data: [DONE]")
        assert all("error" not in json.loads(line[6:]) for line in chunks)
        status, _ = await owui.manage("unload", "a")  # idle now
        assert status == 200
        await reaches(gw, "a", "stopped")


async def test_a_key_may_not_eject_a_model_it_may_not_use(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("a"), fake_engine_spec("b"))
    async with run_gateway(models, api_keys=KEYS) as gw, aiohttp.ClientSession() as session:
        everything, laptop = OpenWebUI(session, gw.v1, KEY), OpenWebUI(session, gw.v1, ONLY_A)
        assert (await everything.manage("load", "b"))[0] == 200
        await reaches(gw, "b", "ready")
        assert await laptop.loaded() == {"a": False}
        for operation in ("unload", "load"):
            status, refused = await laptop.manage(operation, "b")
            assert status == 403 and refused["error"]["code"] == "model_not_allowed"
        assert gw.waker.controller("b").state == "ready"
        assert await everything.chat("b") == 200


async def test_hidden_aliases_still_route(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("a", aliases=["brain"]))
    async with run_gateway(models, list_aliases=False) as gw, aiohttp.ClientSession() as session:
        owui = OpenWebUI(session, gw.v1, "unused")
        assert await owui.loaded() == {"a": False}
        assert await owui.chat("brain") == 200
        assert await owui.loaded() == {"a": True}


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
async def test_the_list_needs_a_key_like_everything_else(tmp_path: Path, path: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("a"))
    async with run_gateway(models, api_keys=KEYS) as gw, aiohttp.ClientSession() as session:
        async with session.get(gw.url + path) as resp:
            assert resp.status == 401
        async with session.get(gw.url + path, headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200 and (await resp.json())["data"][0]["status"] == {"value": "unloaded"}
