"""Random input against a running gateway (hypothesis): random bytes, random JSON, objects with a
random, missing or non-string `model`, bodies up to and past the size limit, random paths under
/v1/ and random methods. The gateway itself never answers 5xx, every error is OpenAI-shaped, and
nothing is started.

One gateway serves every example: it runs on an event loop this module keeps, and the (sync)
hypothesis tests call into that loop; no engine is reachable by any generated name, so a 5xx could
only be the gateway's own."""

import asyncio
import json
import logging
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from tests.chaos.util import assert_openai_error
from tests.harness import Gateway, fake_engine_spec, run_gateway, write_models

KNOWN = "fuzz-target-never-started"
ALIAS = "fuzz-alias-never-started"
BODY_LIMIT = 64 * 1024
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
FUZZ = settings(max_examples=200, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Running:
    loop: asyncio.AbstractEventLoop
    gw: Gateway
    client: httpx.AsyncClient
    errors: Collect  # ERROR records the gateway logged ("Exception in ASGI application" ...)

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> httpx.Response:
        request = self.client.request(method, self.gw.url + path, content=body, headers=headers)
        return self.loop.run_until_complete(request)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    models = write_models(tmp_path_factory.mktemp("fuzz"), fake_engine_spec(KNOWN, aliases=[ALIAS], memory_gb=1))
    loop = asyncio.new_event_loop()
    gateway = run_gateway(Path(models), max_body_bytes=BODY_LIMIT)
    gw = loop.run_until_complete(gateway.__aenter__())
    client = httpx.AsyncClient(timeout=30)
    errors = Collect()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "sparkgate")]
    for logger in loggers:  # after uvicorn configured its logging, which would drop the handler
        logger.addHandler(errors)
    try:
        yield Running(loop, gw, client, errors)
        assert gw.starts(KNOWN) == 0  # nothing was ever started, over every example of the module
        assert gw.waker.controller(KNOWN).state == "stopped"
        assert gw.waker.admissions["local"].queued == 0
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(gateway.__aexit__(None, None, None))
        loop.close()


def check(running: Running, resp: httpx.Response, method: str) -> None:
    """Never a 5xx; every error OpenAI-shaped (HEAD answers carry no body); nothing started."""
    if currently_in_test_context():
        event(f"{method} -> {resp.status_code}")  # shown by --hypothesis-show-statistics
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert running.gw.starts(KNOWN) == 0
    if resp.status_code >= 400 and method != "HEAD":
        assert resp.headers["content-type"].startswith("application/json"), resp.headers
        assert_openai_error(resp.json())


# -- strategies -------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
unknown_names = st.text(max_size=30).filter(lambda s: s not in (KNOWN, ALIAS))
model_values = unknown_names | json_values.filter(lambda v: not isinstance(v, str) or v not in (KNOWN, ALIAS))


@st.composite
def objects(draw: st.DrawFn) -> bytes:
    """A JSON object that looks like a request: `model` random, of any type, or missing."""
    body: dict[str, Any] = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    body.pop("model", None)
    for key, strategy in (("model", model_values), ("messages", json_values), ("stream", json_values),
                          ("max_tokens", json_values)):
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return json.dumps(body).encode()  # NaN/Infinity kept: Python's parser accepts them, others not


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    """A long string (in `model` or in a message), sized around the body limit."""
    size = draw(st.integers(BODY_LIMIT - 200, BODY_LIMIT + 200) | st.integers(0, BODY_LIMIT))
    text = draw(st.characters()) * size
    if draw(st.booleans()):
        return json.dumps({"model": text, "messages": []}, ensure_ascii=False).encode(errors="surrogatepass")
    model = draw(unknown_names)
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()


bodies = st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()) | objects() | huge()
segments = st.text(max_size=12).map(lambda s: quote(s, safe=""))
paths = st.sampled_from(["chat/completions", "completions", "embeddings", "responses", "models", "models/x",
                         "audio/speech", "", "models/" + quote("a b/c", safe="")]) \
    | st.lists(segments, max_size=4).map("/".join) \
    | st.text(alphabet=string.ascii_letters + string.digits + "-._~/", max_size=30)
content_types = st.sampled_from([None, "application/json", "text/plain", "application/octet-stream",
                                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])


# -- tests ------------------------------------------------------------------------------------------

@FUZZ
@given(body=bodies, path=st.sampled_from(["chat/completions", "completions", "embeddings", "responses"]),
       content_type=content_types)
def test_random_bodies_get_4xx_openai_errors_and_start_nothing(
        running: Running, body: bytes, path: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = running.send("POST", "/v1/" + path, body, headers)
    check(running, resp, "POST")
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if len(body) > BODY_LIMIT:
        # Too large; unless (a keyless gateway) it is not JSON at all, which the door refuses first (403).
        json_body = content_type is None or content_type == "application/json"
        assert (resp.status_code, resp.json()["error"]["code"]) in ((413, "request_too_large"),) if json_body \
            else resp.status_code in (403, 413)


@FUZZ
@given(method=st.sampled_from(METHODS), path=paths, body=st.none() | bodies)
def test_random_methods_and_paths_under_v1_never_get_5xx(
        running: Running, method: str, path: str, body: bytes | None) -> None:
    resp = running.send(method, "/v1/" + path, body, {})
    check(running, resp, method)
    # Dot segments are resolved by the client: "/v1/." is sent as "/v1" (Starlette answers 307 to
    # "/v1/"), "/v1/.." as "/". Only what really arrives under /v1/ reaches the proxy.
    if method == "POST" and resp.request.url.raw_path.startswith(b"/v1/"):
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])


def test_bad_input_logs_no_internal_error(running: Running) -> None:
    resp = running.send("GET", "/v1/models/" + quote("no such model", safe=""), None, {})
    check(running, resp, "GET")
    assert resp.status_code == 404
    running.loop.run_until_complete(asyncio.sleep(0.05))  # the log line follows the answer
    assert not running.errors.records, [r.getMessage() for r in running.errors.records]
