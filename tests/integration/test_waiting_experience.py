"""The best waiting experience, end to end (issue 18): a stream for a cold model gets its 200 and a first comment at
once; opted-in chat streams see the wake (Open WebUI's status line, or reasoning_content), and no one else ever does;
a non-streaming request whose SDK would time out first is answered at once with a Retry-After it obeys, while the
model's start goes on; and the retry headers make the OpenAI SDK retry what may succeed and only that.

The engine of a test is held back by a file the test creates (`gated`): whatever the test reads before it creates it
was sent while the model was still starting, with no timing involved. Every test here failed on the code before
issue 18 (see each docstring)."""

import asyncio
import json
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.clients.util import data_payloads, requests_total, sse_events, until
from tests.harness import Gateway, fake_engine_spec, run_gateway, write_models
from waker.state import ModelState

S = ModelState
MESSAGES = [{"role": "user", "content": "hi"}]
WEBUI_KEY, PLAIN_KEY, QUIET_KEY = "sk-webui-0001", "sk-plain-0002", "sk-quiet-0003"
KEYS = [{"key": WEBUI_KEY, "name": "webui", "progress": "open-webui"}, {"key": PLAIN_KEY, "name": "plain"},
        {"key": QUIET_KEY, "name": "quiet", "progress": "off"}]


def gated(name: str, gate: Path, *flags: str, **fields: Any) -> dict[str, Any]:
    """A fake engine whose process waits for `gate` to exist before it even listens: a start the test holds."""
    spec = fake_engine_spec(name, *flags, **fields)
    engine = " ".join(shlex.quote(part) for part in spec["command"])
    spec["command"] = ["sh", "-c", f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.02; done; exec {engine}"]
    return spec


async def lines_of(response: Any) -> AsyncIterator[str]:
    async for line in response.iter_lines():
        yield line


def open_webui_reads(line: str) -> dict[str, Any] | None:
    """A line as Open WebUI's stream handler reads it (backend/open_webui/utils/middleware.py): only `data:` lines,
    JSON after the prefix; None for anything else (comments, blank lines, [DONE] fails json and is skipped)."""
    if not line.startswith("data:"):
        return None
    try:
        return json.loads(line[len("data:"):].strip())
    except ValueError:
        return None


async def wait_state(gw: Gateway, model: str, state: S) -> None:
    controller = gw.waker.controller(model)
    await until(lambda: controller.state is state, timeout=30, what=f"{model} {state.value}")


async def test_a_stream_for_a_cold_model_gets_its_200_and_a_first_comment_before_the_engine_is_up(
        tmp_path: Path) -> None:
    """Before: the 200 and the first comment went out only after keepalive_interval (here an hour: never)."""
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("m", gate))
    async with run_gateway(models, keepalive_interval=3600) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        async with client.stream("POST", gw.v1 + "/chat/completions", json=body) as resp:
            chunks = resp.aiter_raw()
            async with asyncio.timeout(20):  # a bound for the old code, which sent nothing: no timing is asserted
                first = await anext(chunks)
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "text/event-stream"
            assert first.startswith(b": waking m (")
            assert gw.waker.controller("m").state is S.STARTING  # the engine is held: these bytes came first
            gate.touch()
            rest = b"".join([piece async for piece in chunks])
        payloads = data_payloads(first + rest)
        assert payloads[-1] == "[DONE]"
        assert "".join(p["choices"][0]["delta"]["content"] for p in payloads[:-1]) == " t0 t1"


async def test_open_webui_sees_the_wake_on_its_status_line_and_it_is_gone_when_the_answer_begins(
        tmp_path: Path) -> None:
    """Before: comments only (Open WebUI showed nothing while a model woke)."""
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("big", gate))
    async with run_gateway(models, api_keys=KEYS, keepalive_interval=0.2) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key=WEBUI_KEY, max_retries=0, timeout=30)
        statuses: list[dict[str, Any]] = []
        chunks: list[dict[str, Any]] = []
        async with sdk.chat.completions.with_streaming_response.create(
                model="big", messages=MESSAGES, max_tokens=3, stream=True) as response:
            lines = lines_of(response)
            async with asyncio.timeout(30):
                # The wake as Open WebUI's event emitter gets it, phase by phase, until the engine loads.
                while not statuses or "loading the model" not in statuses[-1]["description"]:
                    data = open_webui_reads(await anext(lines))
                    if data is not None:
                        assert set(data) == {"event"}  # no choices: nothing reaches the answer
                        assert data["event"]["type"] == "status"
                        statuses.append(data["event"]["data"])
            assert gw.waker.controller("big").state is S.STARTING
            gate.touch()
            async for line in lines:
                data = open_webui_reads(line)
                if data is None:
                    continue
                if "event" in data:
                    assert "choices" not in data and not chunks, "the status line ends before the first engine byte"
                    statuses.append(data["event"]["data"])
                else:
                    chunks.append(data)
        assert all(s["description"].startswith("Waking big: ") and s["done"] is False for s in statuses[:-1])
        assert statuses[-1] == {"description": "big is ready", "done": True, "hidden": True}
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == " t0 t1 t2"
        assert not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks)


async def test_reasoning_progress_for_a_model_that_opts_in_reads_as_ordinary_chunks(tmp_path: Path) -> None:
    """Before: comments only."""
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("thinker", gate, progress="reasoning"))
    async with run_gateway(models, keepalive_interval=0.2) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=30)
        stream = await sdk.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=2, stream=True)
        reasoning: list[str] = []
        content: list[str] = []
        async for chunk in stream:
            delta = chunk.choices[0].delta  # every chunk is an ordinary one to the SDK
            thought = getattr(delta, "reasoning_content", None)
            if thought:
                reasoning.append(thought)
                if not gate.exists():
                    assert gw.waker.controller("thinker").state is S.STARTING
                    gate.touch()
            if delta.content:
                content.append(delta.content)
        assert reasoning[0].startswith("Waking thinker: ") and reasoning[0].endswith("\n")
        assert reasoning[-1].startswith("thinker is ready after ")
        assert "".join(content) == " t0 t1"


async def test_nobody_who_did_not_opt_in_ever_gets_progress(tmp_path: Path) -> None:
    """Progress only for streaming chat completions of keys or models that opted in: never /v1/completions, never a
    non-streaming answer, never a key that says off; a plain SDK client parses every chunk."""
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("shown", gate, progress="open-webui"), gated("plain", gate))
    async with run_gateway(models, api_keys=KEYS, keepalive_interval=0.2) as gw, \
            httpx.AsyncClient(timeout=30) as client:

        async def held_then_released(model: str, path: str, key: str, body: dict[str, Any]) -> bytes:
            """The whole answer to a request sent while `model` is cold and held, released once it waits."""
            await gw.waker.stop(model)
            gate.unlink(missing_ok=True)
            headers = {"Authorization": f"Bearer {key}"}
            if not body.get("stream"):
                request = asyncio.create_task(client.post(gw.v1 + path, json={"model": model, **body},
                                                          headers=headers))
                await wait_state(gw, model, S.STARTING)
                gate.touch()
                return (await request).content
            async with client.stream("POST", gw.v1 + path, json={"model": model, **body}, headers=headers) as resp:
                chunks = resp.aiter_raw()
                received = await anext(chunks)  # what was sent while it waits
                assert gw.waker.controller(model).state is S.STARTING
                gate.touch()
                return received + b"".join([piece async for piece in chunks])

        def progress_in(raw: bytes) -> list[Any]:
            return [p for p in data_payloads(raw) if isinstance(p, dict) and (
                "event" in p or any("reasoning_content" in c.get("delta", {}) for c in p.get("choices", [])))]

        stream = {"stream": True, "max_tokens": 2}
        # The model opted in, and so sees a key without a setting of its own...
        shown = await held_then_released("shown", "/chat/completions", PLAIN_KEY, {"messages": MESSAGES, **stream})
        assert progress_in(shown)
        # ...but never on /v1/completions (Continue's autocomplete would insert it into the code),
        text = await held_then_released("shown", "/completions", PLAIN_KEY, {"prompt": "def f(", **stream})
        assert sse_events(text)[0].startswith(": waking shown") and not progress_in(text)
        # nor for a key that says off, nor in a non-streaming answer.
        quiet = await held_then_released("shown", "/chat/completions", QUIET_KEY, {"messages": MESSAGES, **stream})
        assert sse_events(quiet)[0].startswith(": waking shown") and not progress_in(quiet)
        whole = await held_then_released("shown", "/chat/completions", WEBUI_KEY, {"messages": MESSAGES})
        assert json.loads(whole)["choices"][0]["message"]["content"]

        # A plain OpenAI SDK client of a model and key that did not opt in: ordinary chunks only.
        await gw.waker.stop("plain")
        gate.unlink()
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key=PLAIN_KEY, max_retries=0, timeout=30)
        async with sdk.chat.completions.with_streaming_response.create(
                model="plain", messages=MESSAGES, max_tokens=2, stream=True) as response:
            raw = [line async for line in _release_after_first(response, gate)]
        parsed = [open_webui_reads(line) for line in raw]
        assert [p for p in parsed if p is not None and ("event" in p or "choices" not in p)] == []
        assert raw[0].startswith(": waking plain")
        stream_again = await sdk.chat.completions.create(model="plain", messages=MESSAGES, max_tokens=2, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream_again]) == " t0 t1"


async def _release_after_first(response: Any, gate: Path) -> AsyncIterator[str]:
    async for line in response.iter_lines():
        yield line
        gate.touch()


def recording_sdk(gw: Gateway, **options: Any) -> tuple[openai.AsyncOpenAI, list[float], list[httpx.Response],
                                                          list[str]]:
    """An SDK client that records the waits it computes before each retry (from our headers: its own code) and then
    retries at once, the responses it got and the retry counts it sent."""
    responses: list[httpx.Response] = []
    counts: list[str] = []

    async def on_request(request: Any) -> None:
        counts.append(request.headers["x-stainless-retry-count"])

    async def on_response(response: Any) -> None:
        responses.append(response)

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
    sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", http_client=http, **options)
    waits: list[float] = []
    computed = sdk._calculate_retry_timeout

    def wait_recorded(remaining: int, opts: Any, headers: Any = None) -> float:
        waits.append(computed(remaining, opts, headers))
        return 0.0

    sdk._calculate_retry_timeout = wait_recorded  # type: ignore[method-assign]
    return sdk, waits, responses, counts


async def test_a_client_whose_timeout_is_shorter_than_the_models_start_is_answered_at_once_and_told_when(
        tmp_path: Path) -> None:
    """Before: the request waited and the SDK timed out (APITimeoutError), retrying blind."""
    gate = tmp_path / "gate"
    gate.touch()
    models = write_models(tmp_path / "models", gated("big", gate, "--ready-after", "3"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        first = await client.post(gw.v1 + "/chat/completions", json={"model": "big", "messages": MESSAGES})
        assert first.status_code == 200  # one start: its history says 3 s and more
        history = gw.waker.describe().model("big").typical_start_s
        assert history is not None and history >= 3
        await gw.waker.stop("big")
        gate.unlink()

        sdk, waits, responses, counts = recording_sdk(gw, timeout=1.0, max_retries=1)
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(model="big", messages=MESSAGES, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.code == "model_not_ready"
        assert "x-stainless-read-timeout" in caught.value.message
        # Answered while the engine is still held back (its start was begun for the retry to find), and retried once
        # after the wait the gateway gave: the SDK's own computation, from retry-after-ms.
        assert gw.waker.controller("big").state is S.STARTING
        assert counts == ["0", "1"]
        assert [r.status_code for r in responses] == [503, 503]
        assert responses[0].headers["x-should-retry"] == "true"
        assert waits == [int(responses[0].headers["retry-after-ms"]) / 1000]
        assert 0 < waits[0] < history + 0.01 and int(responses[0].headers["retry-after"]) < 60  # ms rounded
        assert await requests_total(gw, "503", "big") == 2

        gate.touch()
        await wait_state(gw, "big", S.READY)  # the start went on without anyone waiting on it
        reply = await sdk.chat.completions.create(model="big", messages=MESSAGES, max_tokens=2)
        assert reply.choices[0].message.content == " t0 t1"
        assert gw.starts("big") == 2


async def test_a_stream_whose_client_times_out_sooner_than_the_keepalive_is_kept_alive_not_refused(
        tmp_path: Path) -> None:
    """Before: comments every keepalive_interval (5 s) only: a 1 s read timeout fired during the start."""
    models = write_models(tmp_path, fake_engine_spec("big", "--ready-after", "3"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        await client.post(gw.v1 + "/chat/completions", json={"model": "big", "messages": MESSAGES})
        await gw.waker.stop("big")  # its history says 3 s: more than the client's timeout
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", timeout=1.0, max_retries=0)
        raw = await sdk.chat.completions.with_raw_response.create(model="big", messages=MESSAGES, max_tokens=2,
                                                                  stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in raw.parse()]) == " t0 t1"
        assert raw.retries_taken == 0 and gw.starts("big") == 2


async def test_no_room_is_retried_after_its_retry_after_and_the_sdk_says_which_try_it_is(tmp_path: Path) -> None:
    """Before: no `x-should-retry` and no `retry-after-ms`."""
    models = write_models(tmp_path, fake_engine_spec("keeper", memory_gb=80, pinned=True),
                          fake_engine_spec("big", memory_gb=60))
    nodes = {"local": {"total_gb": 100, "reserve_gb": 0, "memory_probe": "none"}}
    async with run_gateway(models, nodes=nodes, preload=["keeper"]) as gw:
        await wait_state(gw, "keeper", S.READY)  # pinned: big can never fit beside it
        sdk, waits, responses, counts = recording_sdk(gw, max_retries=2)
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(model="big", messages=MESSAGES)
        assert caught.value.code == "no_room"
        assert counts == ["0", "1", "2"]
        assert all(r.headers["x-should-retry"] == "true" and r.headers["retry-after-ms"] == "10000" for r in responses)
        assert waits == [10.0, 10.0]  # as told, not the SDK's own 0.5-8 s backoff
        assert await requests_total(gw, "503", "big") == 3


async def test_the_one_hour_limit_is_not_retried_by_the_sdk(tmp_path: Path) -> None:
    """Before: a 504 request_timeout was retried (>= 500), the whole limit waited again each time."""
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("stuck", gate))
    async with run_gateway(models, request_timeout=1.0) as gw:
        sdk, waits, responses, counts = recording_sdk(gw, max_retries=2)
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(model="stuck", messages=MESSAGES)
        assert caught.value.status_code == 504 and caught.value.code == "request_timeout"
        assert responses[0].headers["x-should-retry"] == "false"
        assert counts == ["0"] and waits == []
        assert await requests_total(gw, "504", "stuck") == 1
