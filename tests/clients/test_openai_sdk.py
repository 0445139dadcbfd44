"""The official OpenAI SDK's retry behaviour against the gateway: 429 and 503 carry `Retry-After`,
the SDK's automatic retries wait as told, and the gateway's error messages reach the caller as the
SDK's own exceptions (also from inside a stream whose 200 was already sent)."""

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.clients.util import requests_total, sse_events, until
from tests.harness import fake_engine_spec, run_gateway, write_models

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_429_when_the_model_is_busy_is_retried_after_retry_after_and_succeeds(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("solo", "--token-delay", "0.05", max_concurrent=1,
                                                     max_waiting=0))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        controller = gw.waker.controller("solo")
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=30)
        await sdk.chat.completions.create(model="solo", messages=MESSAGES, max_tokens=1)  # warm
        # A slow request (40 tokens at 50 ms: 2 s) holds the only slot.
        slow = asyncio.create_task(sdk.chat.completions.create(model="solo", messages=MESSAGES, max_tokens=40))
        await until(lambda: controller.in_flight == 1, timeout=10, what="the slow request in flight")

        # What the SDK sees on the wire: 429, Retry-After, an OpenAI error body.
        busy = await client.post(gw.v1 + "/chat/completions", json={"model": "solo", "messages": MESSAGES})
        assert busy.status_code == 429
        retry_after = int(busy.headers["retry-after"])
        assert retry_after >= 1
        error = busy.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert "max_concurrent" in error["message"]
        # Without retries the SDK raises its RateLimitError with our message.
        with pytest.raises(openai.RateLimitError, match="max_concurrent") as caught:
            await sdk.chat.completions.create(model="solo", messages=MESSAGES, max_tokens=1)
        assert caught.value.status_code == 429 and caught.value.code == "queue_full"

        # With retries it waits as told (not its own 0.5-8 s backoff) and gets the answer.
        retrying = sdk.with_options(max_retries=2)
        began = time.monotonic()
        raw = await retrying.chat.completions.with_raw_response.create(model="solo", messages=MESSAGES, max_tokens=2)
        elapsed = time.monotonic() - began
        assert raw.retries_taken == 1
        assert raw.parse().choices[0].message.content == " t0 t1"
        assert retry_after - 0.5 <= elapsed < retry_after + 5, f"retried after {elapsed:.1f}s, told {retry_after}s"
        assert (await slow).choices[0].message.content == "".join(f" t{i}" for i in range(40))
        assert await requests_total(gw, "429", "solo") == 3  # the raw one, the SDK's unretried one, its first try
        assert await requests_total(gw, "200", "solo") == 3


async def test_start_failure_is_a_503_with_retry_after_and_our_message_in_the_sdk_error(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("crashy", "--exit-at-start", "1"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "crashy", "messages": MESSAGES})
        assert resp.status_code == 503
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["code"] == "model_start_failed"

        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=1, timeout=30)
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(model="crashy", messages=MESSAGES)
        elapsed = time.monotonic() - began
        error = caught.value
        assert error.status_code == 503 and error.code == "model_start_failed"
        assert "crashy" in error.message and "exited with code 1" in error.message
        assert "error: out of memory while loading weights" in error.message  # the engine's log tail
        assert error.response.headers["retry-after"]
        assert elapsed >= 0.9  # the SDK waited the Retry-After (>= 1 s) before its one retry
        assert await requests_total(gw, "503", "crashy") == 3  # ours, the SDK's try and its retry


async def test_model_failing_during_keepalive_wait_raises_api_error_from_the_sdk_stream(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("doomed", "--never-ready", start_timeout="1s"))
    async with run_gateway(models, keepalive_interval=0.2) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=2, timeout=30)
        stream = await sdk.chat.completions.create(model="doomed", messages=MESSAGES, stream=True)
        # The 200 went out with the first keep-alive comment: the failure comes as an SSE error event,
        # which the SDK raises from the stream (no retry is possible any more).
        with pytest.raises(openai.APIError, match="did not become ready within its start_timeout") as caught:
            async for _ in stream:
                pass
        assert "doomed" in caught.value.message
        assert gw.waker.controller("doomed").state == "failed"
        # A first failure is retried at once: the next stream starts the engine again and gets the
        # same in-band error after its keep-alives (raw bytes: comments, then one OpenAI error event).
        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(gw.v1 + "/chat/completions",
                                     json={"model": "doomed", "messages": MESSAGES, "stream": True})
        assert resp.status_code == 200
        events = sse_events(resp.content)
        assert events[0].startswith(": waking doomed") and all(e.startswith(":") for e in events[:-1])
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "model_start_timeout" and "did not become ready" in error["message"]
        # After a second failure the model backs off: the next stream is refused before any byte, a
        # plain 503 with Retry-After that the SDK raises at create() (here without retries).
        with pytest.raises(openai.InternalServerError, match="failed 2 times in a row") as refused:
            await sdk.with_options(max_retries=0).chat.completions.create(
                model="doomed", messages=MESSAGES, stream=True)
        assert refused.value.status_code == 503 and int(refused.value.response.headers["retry-after"]) >= 1
        assert gw.starts("doomed") == 2
