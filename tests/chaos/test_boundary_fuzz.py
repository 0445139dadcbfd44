"""The HTTP boundary, fuzzed over raw sockets against a running gateway with keys (hypothesis): request targets
built from dot segments, percent-encodings, slashes and engine route names; methods; headers (Connection lists,
Origin, Host, Content-Type, good and bad keys); JSON and random bodies.

Whatever arrives: the gateway itself never answers 5xx; nothing reaches the engine outside `/v1/`, and what reaches
it is a normalised path (no dot segment, no encoded slash or backslash, no empty segment); no key and no prompt
appears in any answer or any log line.

Raw sockets, because HTTP clients normalise dot segments before sending (httpx, urllib): an attacker's client does
not. The engine is a recording stand-in behind an `external` model (always ready), so a 5xx could only be the
gateway's own, and every path the gateway forwarded is seen."""

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Gateway, run_gateway, serve_app, write_models

MODEL = "door-model"
KEY = "sk-fuzz-SECRETKEY-0123456789"
ADMIN_KEY = "sk-fuzz-ADMINSECRET-9876543210"
PROMPT = "PROMPT-MARKER-do-not-log-7f3a"
SECRETS = (KEY, ADMIN_KEY, PROMPT, "SECRETKEY", "ADMINSECRET")
FUZZ = settings(max_examples=300, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# What a normalised path under /v1/ never holds: dot segments, encoded dots, slashes, backslashes or NUL, empty
# segments.
UNSAFE = re.compile(r"(^|/)\.{1,2}(/|$|\?)|%2e|%2f|%5c|%00|\\|//", re.IGNORECASE)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # a record that can't be formatted is a bug of its own, but not this test's
            self.lines.append(str(record.msg))


@dataclass
class Running:
    loop: asyncio.AbstractEventLoop
    gw: Gateway
    port: int
    seen: list[str] = field(default_factory=list)  # raw paths the engine received
    logs: Collect = field(default_factory=Collect)

    def send(self, raw: bytes) -> tuple[int, bytes]:
        return self.loop.run_until_complete(self._send(raw))

    async def _send(self, raw: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(raw)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=30)
        finally:
            writer.close()
        head = answer.split(b"\r\n", 1)[0].split()
        return (int(head[1]) if len(head) > 1 and head[1].isdigit() else 0), answer


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    seen: list[str] = []

    async def engine(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        await request.read()
        return web.json_response({"id": "x", "object": "chat.completion", "model": MODEL, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", engine)
    serving = serve_app(app)
    engine_port = loop.run_until_complete(serving.__aenter__())
    models = write_models(tmp_path_factory.mktemp("door"),
                          {"name": MODEL, "runtime": "external", "url": f"http://127.0.0.1:{engine_port}/v1"})
    gateway = run_gateway(Path(models), api_keys=[{"key": KEY, "name": "fuzzer"}], admin_key=ADMIN_KEY)
    gw = loop.run_until_complete(gateway.__aenter__())
    running = Running(loop, gw, int(gw.url.rsplit(":", 1)[1]), seen)
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "sparkgate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(running.logs)
        logger.setLevel(logging.DEBUG)
    try:
        yield running
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(running.logs)
            logger.setLevel(level)
        loop.run_until_complete(gateway.__aexit__(None, None, None))
        loop.run_until_complete(serving.__aexit__(None, None, None))
        loop.close()


# -- strategies -------------------------------------------------------------------------------------

TRICKY = ["..", ".", "%2e%2e", "%2E%2e", "%2e", ".%2e", "%2f", "%2F", "%5c", "%5C", "%00", "%252e%252e", "",
          "\\..", "v1", "sleep", "collective_rpc", "update_weights_from_disk", "release_memory_occupation", "wake_up",
          "chat", "completions", "models", "embeddings", "admin", "metrics", "health", MODEL]
segments = st.sampled_from(TRICKY) | st.text(max_size=8).map(lambda s: quote(s, safe=""))


@st.composite
def targets(draw: st.DrawFn) -> str:
    parts = draw(st.lists(segments, max_size=6))
    prefix = draw(st.sampled_from(["/v1/", "/", "/v1/chat/", "/admin/", "/metrics/", "/v1/../"]))
    target = prefix + "/".join(parts)
    if draw(st.booleans()):
        target += "?" + draw(st.sampled_from(["x=../../sleep", "level=2", "a=%2e%2e", "", "tags=weights"]))
    return target


# Weighted towards what gets furthest in (a good key, a POST with a JSON body naming the model): only such a request
# is routed to an engine, so only it can show a path escaping /v1/.
METHODS = ["POST"] * 5 + ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
header_sets = st.fixed_dictionaries({
    "Authorization": st.sampled_from([f"Bearer {KEY}"] * 6 + [f"Bearer {ADMIN_KEY}", "Bearer sk-wrong", "Basic eA==",
                                                              ""]),
}, optional={
    "Connection": st.sampled_from(["keep-alive, Authorization", "Upgrade", "X-Secret, close", "TE"]),
    "Origin": st.sampled_from(["https://evil.example", "null", "http://127.0.0.1"]),
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x"]),
    "X-Forwarded-For": st.just("10.0.0.1"),
    "Transfer-Encoding": st.just("chunked"),
})
bodies = st.binary(max_size=256) | st.builds(
    lambda stream, extra: json.dumps({"model": MODEL, "stream": stream, "messages": [
        {"role": "user", "content": PROMPT + extra}]}).encode(),
    st.booleans(), st.text(max_size=10)) | st.builds(
    lambda stream, extra: json.dumps({"model": MODEL, "stream": stream, "messages": [
        {"role": "user", "content": PROMPT + extra}]}).encode(),
    st.booleans(), st.text(max_size=10))


def request(method: str, target: str, headers: dict[str, str], body: bytes, port: int, host: str | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close"]
    if "Transfer-Encoding" in headers:
        headers = {k: v for k, v in headers.items() if k != "Transfer-Encoding"}
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
        lines.append("Transfer-Encoding: chunked")
        payload = chunked
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    lines += [f"{name}: {value}" for name, value in headers.items() if name != "Connection"]
    if "Connection" in headers:
        lines[2] = f"Connection: close, {headers['Connection']}"
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


# -- the test -----------------------------------------------------------------------------------------

@FUZZ
@given(method=st.sampled_from(METHODS), target=targets(), headers=header_sets, body=bodies,
       host=st.none() | st.sampled_from(["evil.example", "localhost", "127.0.0.1"]))
def test_nothing_reaches_an_engine_outside_v1_and_nothing_leaks(
        running: Running, method: str, target: str, headers: dict[str, str], body: bytes, host: str | None) -> None:
    before_seen, before_logs = len(running.seen), len(running.logs.lines)
    status, answer = running.send(request(method, target, headers, body, running.port, host))

    assert status != 0, answer[:300]  # an HTTP answer, not a dropped connection
    assert status < 500, answer[:500]
    for path in running.seen[before_seen:]:
        assert path.startswith("/v1/") and not UNSAFE.search(path.split("?", 1)[0]), (target, path)
    text = answer.decode("latin-1")
    for secret in SECRETS:
        assert secret not in text, (secret, text[:500])
    for line in running.logs.lines[before_logs:]:
        for secret in SECRETS:
            assert secret not in line, (secret, line)


def test_a_normal_request_still_reaches_the_engine(running: Running) -> None:
    # The fuzz above would pass if nothing ever got through: a plain, keyed request must.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    before = len(running.seen)
    status, answer = running.send(request("POST", "/v1/chat/completions", {
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, body, running.port, None))
    assert status == 200, answer[:300]
    assert running.seen[before:] == ["/v1/chat/completions"]
