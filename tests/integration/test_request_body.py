"""What the proxy reads in a request body (`model`, `stream`) and how it refuses what it can't read (issue 17): a body
nested deeper than the JSON parser goes is a 400 `invalid_json` with nothing logged, and `stream` must be a boolean,
so the gateway and the engine agree on whether the answer streams."""

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.chaos.util import assert_openai_error
from tests.harness import Gateway, run_gateway, serve_app, write_models


@contextlib.asynccontextmanager
async def gateway_with_engine(tmp_path: Path) -> AsyncIterator[tuple[Gateway, list[Any]]]:
    """A gateway in front of a stand-in engine that records each body it is sent (parsed) and answers 200."""
    bodies: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        bodies.append(json.loads(await request.read()))
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    async with serve_app(app) as port:
        # An alias: the body is parsed and written again with the engine's own name.
        models = write_models(tmp_path, {"name": "m", "aliases": ["alias"], "runtime": "external",
                                         "url": f"http://127.0.0.1:{port}/v1"})
        async with run_gateway(models) as gw:
            yield gw, bodies


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def warnings_logged() -> Iterator[list[logging.LogRecord]]:
    """Every warning or error the gateway or uvicorn logs meanwhile (uvicorn's loggers don't reach the root's)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "sparkgate")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


DEEP = 100_000
TOO_DEEP = {
    "arrays": b"[" * DEEP,
    "inside an object": b'{"model": "m", "messages": ' + b"[" * DEEP,
    "objects": b'{"a":' * DEEP,
}


@pytest.mark.parametrize("body", list(TOO_DEEP.values()), ids=list(TOO_DEEP))
async def test_a_body_nested_too_deeply_is_a_400_invalid_json_and_nothing_is_logged(tmp_path: Path,
                                                                                    body: bytes) -> None:
    async with gateway_with_engine(tmp_path) as (gw, bodies), httpx.AsyncClient(timeout=30) as client:
        with warnings_logged() as logged:
            refused = await client.post(gw.v1 + "/chat/completions", content=body,
                                        headers={"content-type": "application/json"})
            again = await client.post(gw.v1 + "/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
        # It was uvicorn's text/plain 500, and a traceback logged per request.
        assert (refused.status_code, refused.headers["content-type"]) == (400, "application/json"), refused.text
        error = assert_openai_error(refused.json())
        assert error["code"] == "invalid_json" and "nested too deeply" in error["message"]
        assert again.status_code == 400
        assert [(r.name, r.getMessage()) for r in logged] == []
        assert bodies == []  # nothing reached the engine


async def test_a_body_nested_as_deep_as_requests_go_is_forwarded_whole(tmp_path: Path) -> None:
    nested: Any = "x"
    for _ in range(200):
        nested = [nested]
    payload = {"model": "alias", "messages": [{"role": "user", "content": nested}]}
    async with gateway_with_engine(tmp_path) as (gw, bodies), httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/chat/completions", json=payload)
    assert answer.status_code == 200
    assert bodies == [{**payload, "model": "m"}]  # written again with the engine's name, nesting intact


@pytest.mark.parametrize("stream", ["true", 1, "false", 0, [], {}], ids=repr)
async def test_a_stream_field_that_is_not_a_boolean_is_refused_before_the_engine(tmp_path: Path,
                                                                                 stream: object) -> None:
    # vLLM's pydantic request takes "true" and 1 for a stream; the gateway read them as no stream (no keep-alives
    # while the model starts, errors not sent in-band). OpenAI refuses them; so does the gateway now.
    async with gateway_with_engine(tmp_path) as (gw, bodies), httpx.AsyncClient(timeout=30) as client:
        refused = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": [],
                                                                          "stream": stream})
    assert refused.status_code == 400, refused.text
    error = assert_openai_error(refused.json())
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_type", "stream")
    assert error["message"].startswith("Invalid type for 'stream': expected a boolean, but got ")
    assert bodies == []


@pytest.mark.parametrize("stream", [True, False, None], ids=repr)
async def test_a_boolean_or_null_stream_is_forwarded(tmp_path: Path, stream: bool | None) -> None:
    async with gateway_with_engine(tmp_path) as (gw, bodies), httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "stream": stream})
    assert answer.status_code == 200
    assert bodies == [{"model": "m", "stream": stream}]
