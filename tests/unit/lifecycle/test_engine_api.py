"""The engine's HTTP API as the lifecycle calls it: one deadline for a whole sequence, calls repeated while refused,
answers that must hold what the call expects, the key sent along. A small aiohttp app stands in for the engine."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.harness import serve_app
from waker.config.spec import ModelSpec
from waker.engines.base import Call, generation_check
from waker.lifecycle.engine_api import EngineCallError, HttpEngineApi


def answer(status: int = 200, body: object = None, text: str | None = None):  # type: ignore[no-untyped-def]
    """A handler that always answers the same."""
    async def handler(request: web.Request) -> web.Response:
        if text is not None:
            return web.Response(status=status, text=text)
        return web.json_response(body, status=status)
    return handler


@asynccontextmanager
async def engine(routes: dict[str, Any]) -> AsyncIterator[tuple[HttpEngineApi, str, list[str]]]:
    """An engine answering `routes` (path -> handler); yields the API, its root URL and the requests it saw."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.append(f"{request.method} {request.path_qs} {request.headers.get('Authorization', '-')}")
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)  # type: ignore[arg-type]
    async with serve_app(app) as port, aiohttp.ClientSession() as session:
        yield HttpEngineApi(session, interval=0.01, timeout=1), f"http://127.0.0.1:{port}", seen


async def test_a_refused_call_marked_retry_is_made_again_until_the_engine_accepts_it() -> None:
    # SGLang's /flush_cache answers 400 while a request is still in its scheduler; the release must wait for it.
    answers = iter([400, 400, 200])

    async def flush(request: web.Request) -> web.Response:
        return web.Response(status=next(answers))

    async with engine({"/flush_cache": flush, "/release": answer()}) as (api, url, seen):
        await api.call(url, (Call("POST", "/flush_cache", retry=True), Call("POST", "/release")), timeout=5)
    assert [s.split()[1] for s in seen] == ["/flush_cache"] * 3 + ["/release"]


async def test_a_call_refused_until_the_deadline_fails_and_the_next_one_is_never_made() -> None:
    async with engine({"/flush_cache": answer(400, text="busy"),
                       "/release": answer()}) as (api, url, seen):
        with pytest.raises(EngineCallError, match="answered 400: busy"):
            await api.call(url, (Call("POST", "/flush_cache", retry=True), Call("POST", "/release")), timeout=0.2)
    assert seen and all("/flush_cache" in s for s in seen)


async def test_a_refused_call_without_retry_fails_at_once() -> None:
    async with engine({"/sleep": answer(500)}) as (api, url, seen):
        with pytest.raises(EngineCallError, match="answered 500"):
            await api.call(url, (Call("POST", "/sleep"),), timeout=5)
    assert len(seen) == 1


async def test_one_deadline_covers_the_whole_sequence_not_each_call() -> None:
    # A level-2 vLLM wake is three calls: each used to get the whole wake_timeout.
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({})

    async with engine({"/a": slow, "/b": slow}) as (api, url, _):
        with pytest.raises(EngineCallError, match="POST /b failed"):
            await api.call(url, (Call("POST", "/a"), Call("POST", "/b")), timeout=0.5)


@pytest.mark.parametrize(("reply", "problem"), [
    ({"success": False, "message": "no such file"}, "reports no success"),  # SGLang's update_weights_from_disk
    ({"id": "x", "choices": []}, "has no choices"),
    ({"error": "asleep"}, "has no choices"),
])
async def test_a_200_without_what_the_call_expects_is_a_failure(reply: dict, problem: str) -> None:
    async with engine({"/v1/completions": answer(body=reply)}) as (api, url, _):
        with pytest.raises(EngineCallError, match=problem):
            await api.call(url, (Call("POST", "/v1/completions", {}, expect="choices"),), timeout=5)


async def test_the_generation_check_names_the_served_model_and_sends_the_engines_key() -> None:
    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"choices": [{"index": 0, "text": " t0"}]})

    spec = ModelSpec(name="m", served_name="org/m", command=["x"], api_key="sk-engine")
    async with engine({"/v1/completions": completions}) as (api, url, seen):
        await api.call(url, (generation_check(spec),), timeout=5)
    assert bodies[0]["model"] == "org/m" and bodies[0]["max_tokens"] == 1
    assert seen == ["POST /v1/completions Bearer sk-engine"]


@pytest.mark.parametrize("args", [("--runner", "pooling"), ("--task=embed",), ("--convert", "embed", "-tp", "1"),
                                  ("--is-embedding",)])
def test_an_embedding_model_is_checked_with_an_embedding(args: tuple[str, ...]) -> None:
    # A woken embedding model has no completions route: a completion check would fail every wake into a cold start.
    call = generation_check(ModelSpec(name="e", engine="vllm", model="w", args=args))
    assert (call.path, call.expect, call.json) == ("/v1/embeddings", "data", {"model": "e", "input": "Hello"})


def test_a_generator_is_checked_with_a_completion() -> None:
    call = generation_check(ModelSpec(name="g", engine="vllm", model="w", args=("--task", "generate")))
    assert (call.path, call.expect) == ("/v1/completions", "choices")
