"""Background tasks never wake a giant (issue 18), through a real gateway and real engine processes.

Open WebUI starts a new chat's title generation at the same moment as the answer (`asyncio.create_task` in its
main.py), as a non-streaming chat completion whose only user message is its `### Task:` title template, for the chat
model unless a task model is set; tags and follow-ups come after the answer. A title for a cold model must never
start, wake or evict a model: it goes to a warm task model, or gets a fast 503 that Open WebUI falls back from
(gateway/tasks.py). Each test reads what the engines did (their /stats), what the waker did (its events and states)
and what a client saw.
"""

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.clients.util import data_payloads, engine_stats, requests_total
from tests.harness import FAKE_ENGINE, Gateway, fake_engine_spec, run_gateway, write_models

TITLE = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n### Guidelines:\n"
         "- The title should clearly represent the main theme or subject of the conversation.\n### Output:\n"
         'JSON format: { "title": "your concise title here" }\n### Chat History:\n<chat_history>\n'
         "USER: Explain the DGX Spark's unified memory in detail.\n</chat_history>")
QUESTION = [{"role": "user", "content": "Explain the DGX Spark's unified memory in detail."}]
NODE_100 = {"local": {"total_gb": 100, "reserve_gb": 0, "memory_probe": "none"}}
NODE = {"local": {"total_gb": 128, "reserve_gb": 0, "memory_probe": "none"}}  # not this machine's free memory


def title_body(model: str, **extra: Any) -> dict[str, Any]:
    """Open WebUI's title request (routers/tasks.py: one user message, stream false; `metadata` stays inside it)."""
    return {"model": model, "messages": [{"role": "user", "content": TITLE}], "stream": False, "max_tokens": 8,
            **extra}


def kinds(gw: Gateway, *wanted: str, model: str | None = None) -> list[str]:
    return [e.kind for e in gw.waker.events.recent(model) if e.kind in wanted]


def untouched(gw: Gateway, model: str) -> bool:
    """Nothing was done to `model`: no transition at all, no ticket queued for it, no eviction of it."""
    return not [e for e in gw.waker.events.recent(model) if e.kind in ("transition", "queued", "admit", "evict")]


async def ready(gw: Gateway, *models: str) -> None:
    for name in models:
        await gw.waker.warm(name)
        assert gw.waker.controller(name).state == "ready"


async def test_a_new_chats_title_is_answered_by_the_task_model_while_the_answer_cold_starts(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", "--ready-after", "1.5", memory_gb=80),
                          fake_engine_spec("small", memory_gb=10, aliases=["utility"]))
    async with run_gateway(models, nodes=NODE, task_model="utility", keepalive_interval=0.3) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        await ready(gw, "small")
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-unused", timeout=30)
        stream = await sdk.chat.completions.create(model="big", messages=QUESTION, max_tokens=6, stream=True)

        async def read_answer() -> str:
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

        answering = asyncio.create_task(read_answer())
        await gw.waker.events.wait_for(lambda e: e.model == "big" and e.target == "starting", 10)
        began = time.monotonic()
        title = await client.post(gw.v1 + "/chat/completions", json=title_body("big"))
        took = time.monotonic() - began
        state_when_titled = gw.waker.controller("big").state

        assert title.status_code == 200, title.text
        assert title.json()["model"] == gw.waker.resolve("small").upstream_name  # who answered, said plainly
        assert title.json()["choices"][0]["message"]["content"] == " t0 t1 t2 t3 t4 t5 t6 t7"
        assert state_when_titled == "starting" and took < 1.0, "the title waited for the cold start"
        assert await asyncio.wait_for(answering, 20) == " t0 t1 t2 t3 t4 t5"
        assert gw.starts("big") == 1 and gw.starts("small") == 1  # big by the answer, small by warm
        assert (await engine_stats(gw, "small"))["requests"] == 1
        assert (await engine_stats(gw, "big"))["requests"] == 1  # the answer only
        routed = [e for e in gw.waker.events.recent("big") if e.kind == "task_routed"]
        assert len(routed) == 1 and routed[0].reason == "starting"
        assert routed[0].data == {"rule": "prefix", "task_model": "small"}


async def test_without_a_task_model_the_title_is_a_fast_503_that_the_sdk_does_not_retry(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", "--ready-after", "1.5", memory_gb=80))
    async with run_gateway(models, nodes=NODE, keepalive_interval=0.3) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-unused", timeout=30)  # max_retries: its default 2
        stream = await sdk.chat.completions.create(model="big", messages=QUESTION, max_tokens=4, stream=True)

        async def read_answer() -> str:
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

        answering = asyncio.create_task(read_answer())
        await gw.waker.events.wait_for(lambda e: e.model == "big" and e.target == "starting", 10)
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError) as refused:
            await sdk.chat.completions.create(**title_body("big"))
        assert time.monotonic() - began < 1.0 and gw.waker.controller("big").state == "starting"
        response = refused.value.response
        assert response.status_code == 503
        assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
        error = response.json()["error"]
        assert error["code"] == "model_not_ready_for_task" and error["type"] == "server_error"
        assert "'big' is starting; no task_model is set" in error["message"]
        assert await requests_total(gw, "503", "big") == 1  # asked once: the SDK took x-should-retry at its word

        assert await asyncio.wait_for(answering, 20) == " t0 t1 t2 t3"
        assert gw.starts("big") == 1
        assert (await engine_stats(gw, "big"))["requests"] == 1


async def test_a_title_alone_for_a_cold_model_starts_nothing_and_evicts_nothing(tmp_path: Path) -> None:
    # big (80 GB) fits only if both warm models are evicted; a title for it must not do that.
    models = write_models(tmp_path, fake_engine_spec("big", memory_gb=80), fake_engine_spec("mid", memory_gb=50),
                          fake_engine_spec("small", memory_gb=30))
    async with run_gateway(models, nodes=NODE_100) as gw, httpx.AsyncClient(timeout=30) as client:
        await ready(gw, "mid", "small")
        parts = {"model": "big", "stream": False, "messages": [
            {"role": "user", "content": [{"type": "text", "text": TITLE}]}]}  # content as text parts
        for body in (title_body("big"), parts, title_body("big", stream=None)):
            refused = await client.post(gw.v1 + "/chat/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_ready_for_task"
        assert gw.waker.controller("big").state == "stopped"
        assert untouched(gw, "big")
        assert kinds(gw, "evict", "queued", "drain") == []
        assert [gw.waker.controller(n).state for n in ("mid", "small")] == ["ready", "ready"]
        assert kinds(gw, "task_refused", model="big") == ["task_refused"] * 3
        # and it is on /admin/events for whoever follows them
        async with asyncio.timeout(10), client.stream("GET", gw.url + "/admin/events?recent=50") as events:
            async for line in events.aiter_lines():
                if '"task_refused"' in line:
                    assert '"model": "big"' in line and '"rule": "prefix"' in line
                    break


async def test_a_title_for_a_sleeping_model_does_not_wake_it(tmp_path: Path) -> None:
    napper = {"name": "napper", "engine": "vllm", "model": "org/fake-weights", "command": [sys.executable, FAKE_ENGINE],
              "start_timeout": "20s", "stop_timeout": "5s", "min_uptime": 0, "memory_gb": 40, "sleep_memory_gb": 4,
              "idle_action": "sleep"}
    models = write_models(tmp_path, napper)
    async with run_gateway(models, nodes=NODE_100) as gw, httpx.AsyncClient(timeout=30) as client:
        await ready(gw, "napper")
        assert gw.waker.sleep("napper")
        await gw.waker.events.wait_for(lambda e: e.model == "napper" and e.target == "sleeping", 10)
        refused = await client.post(gw.v1 + "/chat/completions", json=title_body("napper"))
        assert refused.status_code == 503 and "'napper' is sleeping" in refused.json()["error"]["message"]
        assert gw.waker.controller("napper").state == "sleeping"
        assert not [e for e in gw.waker.events.recent("napper") if e.kind == "transition" and e.target == "waking"]


async def test_the_header_rule_marks_any_request_and_an_empty_value_marks_none(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", memory_gb=80))
    # Open WebUI fills a connection's custom header `X-OpenWebUI-Task: {{TASK}}` with the task's name, and with
    # nothing for the chat itself.
    async with run_gateway(models, nodes=NODE, task_header="X-OpenWebUI-Task") as gw, \
            httpx.AsyncClient(timeout=30) as client:
        streaming = {"model": "big", "messages": QUESTION, "max_tokens": 2, "stream": True}
        marked = await client.post(gw.v1 + "/chat/completions", json=streaming,
                                   headers={"X-OpenWebUI-Task": "query_generation"})
        assert marked.status_code == 503 and marked.json()["error"]["code"] == "model_not_ready_for_task"
        assert untouched(gw, "big")
        assert kinds(gw, "task_refused", model="big") == ["task_refused"]
        assert gw.waker.events.recent("big")[-1].data["rule"] == "header"

        chat = await client.post(gw.v1 + "/chat/completions", json=streaming, headers={"X-OpenWebUI-Task": ""})
        assert chat.status_code == 200, chat.content
        assert "".join(p["choices"][0]["delta"]["content"] for p in data_payloads(chat.content)[:-1]) == " t0 t1"
        assert gw.starts("big") == 1


async def test_a_task_key_never_starts_a_model_and_other_keys_do(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", memory_gb=80))
    keys = [{"key": "sk-owui-tasks-1", "name": "owui-tasks", "tasks": True}, {"key": "sk-owui-chat-1", "name": "chat"}]
    async with run_gateway(models, nodes=NODE, api_keys=keys) as gw, httpx.AsyncClient(timeout=30) as client:
        plain = {"model": "big", "messages": QUESTION, "max_tokens": 2}  # no prefix: the key alone decides
        refused = await client.post(gw.v1 + "/chat/completions", json=plain,
                                    headers={"Authorization": "Bearer sk-owui-tasks-1"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_ready_for_task"
        assert untouched(gw, "big") and gw.waker.events.recent("big")[-1].data["rule"] == "key"

        served = await client.post(gw.v1 + "/chat/completions", json=plain,
                                   headers={"Authorization": "Bearer sk-owui-chat-1"})
        assert served.status_code == 200 and gw.starts("big") == 1
        again = await client.post(gw.v1 + "/chat/completions", json=plain,
                                  headers={"Authorization": "Bearer sk-owui-tasks-1"})
        assert again.status_code == 200  # the model is up now: the task key is served by it
        assert gw.starts("big") == 1


async def test_a_task_for_a_ready_model_is_served_by_it_and_goes_to_the_task_model_once_it_stopped(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", memory_gb=80), fake_engine_spec("small", memory_gb=10))
    async with run_gateway(models, nodes=NODE, task_model="small") as gw, httpx.AsyncClient(timeout=30) as client:
        await ready(gw, "big", "small")
        served = await client.post(gw.v1 + "/chat/completions", json=title_body("big"))
        assert served.status_code == 200 and served.json()["model"] == gw.waker.resolve("big").upstream_name
        assert kinds(gw, "task_routed", "task_refused") == []
        assert (await engine_stats(gw, "small"))["requests"] == 0

        await gw.waker.stop("big")
        routed = await client.post(gw.v1 + "/chat/completions", json=title_body("big"))
        assert routed.status_code == 200 and routed.json()["model"] == gw.waker.resolve("small").upstream_name
        assert gw.waker.controller("big").state == "stopped" and gw.starts("big") == 1
        assert (await engine_stats(gw, "small"))["requests"] == 1


async def test_the_task_model_is_refused_to_a_key_that_may_not_use_it(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", memory_gb=80), fake_engine_spec("small", memory_gb=10))
    keys = [{"key": "sk-big-only-1", "name": "big-only", "models": ["big"]}]
    async with run_gateway(models, nodes=NODE, task_model="small", api_keys=keys) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        await ready(gw, "small")
        refused = await client.post(gw.v1 + "/chat/completions", json=title_body("big"),
                                    headers={"Authorization": "Bearer sk-big-only-1"})
        assert refused.status_code == 503
        assert "this key may not use the task model 'small'" in refused.json()["error"]["message"]
        assert untouched(gw, "big")
        assert (await engine_stats(gw, "small"))["requests"] == 0


async def test_a_title_does_not_wait_behind_the_answer_for_a_max_concurrent_place(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", "--token-delay", "0.1", memory_gb=80, max_concurrent=1),
                          fake_engine_spec("small", memory_gb=10))
    async with run_gateway(models, nodes=NODE, task_model="small") as gw, httpx.AsyncClient(timeout=30) as client:
        await ready(gw, "big", "small")
        answer = {"model": "big", "messages": QUESTION, "max_tokens": 20, "stream": True}
        async with client.stream("POST", gw.v1 + "/chat/completions", json=answer) as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("data: ")  # the answer holds big's one place
            began = time.monotonic()
            title = await client.post(gw.v1 + "/chat/completions", json=title_body("big"))
            assert title.status_code == 200 and time.monotonic() - began < 1.0
            assert title.json()["model"] == gw.waker.resolve("small").upstream_name
            assert [line async for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        routed = [e for e in gw.waker.events.recent("big") if e.kind == "task_routed"]
        assert len(routed) == 1 and routed[0].reason.startswith("busy")


async def test_a_service_is_never_the_task_model(tmp_path: Path) -> None:
    """A task model that names a service (engine: service) would get a chat body it has no route for: refused, and the
    service is not started."""
    from tests.integration.test_services import service_spec

    models = write_models(tmp_path, fake_engine_spec("big", memory_gb=80), service_spec("comfy", memory_gb=10))
    async with run_gateway(models, nodes=NODE, task_model="comfy") as gw, httpx.AsyncClient(timeout=30) as client:
        refused = await client.post(gw.v1 + "/chat/completions", json=title_body("big"))
        assert refused.status_code == 503
        assert "a service, not a model" in refused.json()["error"]["message"]
        assert untouched(gw, "big") and gw.starts("comfy") == 0
