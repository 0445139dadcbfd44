"""A hostile, unlucky user of the waiting path (gateway/progress.py, gateway/hints.py, gateway/tasks.py): starts that
fail while a progress stream waits, clients that leave mid-wait, models removed mid-wait, junk SDK timeout headers
and junk task bodies. Each must end cleanly: the right status and words, no lease or waiter left behind, no 500 and
nothing logged as an exception.

Engines are held by a file the test creates (`gated`, as in test_waiting_experience.py): no timing is asserted."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.clients.util import until
from tests.harness import fake_engine_spec, run_gateway, write_models
from tests.integration.test_waiting_experience import MESSAGES, gated, open_webui_reads, wait_state
from waker.state import ModelState

S = ModelState
WEBUI_KEY = "sk-webui-hostile"
KEYS = [{"key": WEBUI_KEY, "name": "webui", "progress": "open-webui"}]


def no_exception_logged(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert logged == [], [r.getMessage() for r in logged]


async def statuses_then_rest(lines: AsyncIterator[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Open WebUI's status events of the rest of a stream, and every other data payload after them."""
    statuses: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    async for line in lines:
        data = open_webui_reads(line)
        if data is None:
            continue
        if "event" in data:
            assert not rest, "a status after the end of the wait"
            statuses.append(data["event"]["data"])
        else:
            rest.append(data)
    return statuses, rest


@pytest.mark.parametrize("style", ["open-webui", "reasoning"])
async def test_a_start_that_fails_while_progress_streams_ends_the_status_without_saying_ready_then_errors(
        tmp_path: Path, style: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the last progress chunk said "<model> is ready" (reasoning: "is ready after N s.") for a start that
    failed, right before the in-band error."""
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("doomed", gate, "--exit-at-start", "3", progress=style))
    async with run_gateway(models, keepalive_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "doomed", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        async with client.stream("POST", gw.v1 + "/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            while not (first := await anext(lines)).startswith("data:"):
                pass
            assert gw.waker.controller("doomed").state is S.STARTING
            gate.touch()
            payloads = [json.loads(first[5:])] + [json.loads(line[5:]) async for line in lines
                                                  if line.startswith("data:") and line != "data: [DONE]"]
        error = payloads[-1]["error"]
        assert error["code"] == "model_start_failed"
        if style == "open-webui":
            last = payloads[-2]["event"]["data"]
            assert last["done"] is True and last["hidden"] is True
            assert last["description"] == "doomed could not be woken"
        else:
            last = payloads[-2]["choices"][0]["delta"]["reasoning_content"]
            assert last.startswith("doomed could not be woken after "), last
        assert gw.waker.controller("doomed").in_flight == 0 and gw.waker.controller("doomed").waiting == 0

        # The OpenAI SDK raises it as an APIError, after the progress chunks it parsed as ordinary ones.
        gate.unlink()
        await gw.waker.stop("doomed")
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key=WEBUI_KEY, max_retries=0, timeout=30)
        stream = await sdk.chat.completions.create(model="doomed", messages=MESSAGES, max_tokens=2, stream=True)
        gate.touch()
        with pytest.raises(openai.APIError, match="doomed"):
            async for _ in stream:
                pass
    no_exception_logged(caplog)


async def test_a_client_that_leaves_while_progress_streams_leaks_no_lease_or_waiter(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("big", gate))
    async with run_gateway(models, api_keys=KEYS, keepalive_interval=0.2, progress_interval=0.2) as gw:
        controller = gw.waker.controller("big")
        for _ in range(3):
            async with httpx.AsyncClient(timeout=30) as client:
                body = {"model": "big", "messages": MESSAGES, "max_tokens": 2, "stream": True}
                async with client.stream("POST", gw.v1 + "/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {WEBUI_KEY}"}) as resp:
                    seen = 0
                    async for line in resp.aiter_lines():
                        seen += line.startswith("data:")
                        if seen >= 2:  # two progress chunks in: leave mid-stream
                            break
            await until(lambda: controller.waiting == 0, timeout=10, what="the waiter is gone")
        assert controller.in_flight == 0
        gate.touch()
        await wait_state(gw, "big", S.READY)  # the start a client left goes on
        assert controller.in_flight == 0 and controller.waiting == 0
    no_exception_logged(caplog)


async def test_a_model_removed_while_its_progress_streams_ends_the_status_then_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("gone", gate, "--never-ready", progress="open-webui",
                                                   start_timeout=2),
                          fake_engine_spec("other"))
    async with run_gateway(models, keepalive_interval=0.2, progress_interval=0.2) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        body = {"model": "gone", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        async with client.stream("POST", gw.v1 + "/chat/completions", json=body) as resp:
            lines = resp.aiter_lines()
            while not (await anext(lines)).startswith("data:"):
                pass
            (models / "gone.yaml").unlink()
            assert (await client.post(gw.url + "/admin/reload")).json()["removed"] == ["gone"]
            gate.touch()
            statuses, rest = await statuses_then_rest(lines)
        assert statuses and statuses[-1]["done"] is True and statuses[-1]["hidden"] is True
        assert statuses[-1]["description"] == "gone could not be woken"
        # A removal doesn't cut a start short (the waker stops a removed model once idle): its waiter is told how the
        # start ended, in-band.
        assert [p["error"]["code"] for p in rest] == ["model_start_timeout"], rest
    no_exception_logged(caplog)


@pytest.mark.parametrize("value", ["nan", "-1", "1e309", "", "9" * 4000, "inf", "abc", "0x10"])
async def test_junk_sdk_timeout_headers_are_ignored(tmp_path: Path, value: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A non-streaming request to a model with a long start history, with a junk timeout header: served, never a
    503 for a timeout nobody announced, never a 500."""
    models = write_models(tmp_path, fake_engine_spec("big", "--ready-after", "1.5"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        first = await client.post(gw.v1 + "/chat/completions", json={"model": "big", "messages": MESSAGES})
        assert first.status_code == 200
        await gw.waker.stop("big")
        for header in ("x-stainless-read-timeout", "X-Stainless-Timeout"):
            reply = await client.post(gw.v1 + "/chat/completions", json={"model": "big", "messages": MESSAGES},
                                      headers={header: value})
            assert reply.status_code == 200, reply.text
            stream = await client.post(gw.v1 + "/chat/completions", headers={header: value},
                                       json={"model": "big", "messages": MESSAGES, "stream": True})
            assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
            await gw.waker.stop("big")
    no_exception_logged(caplog)


@pytest.mark.parametrize("messages", [
    "### Task: a string", {"role": "user", "content": "### Task:"}, None, 7, [None, 3, "x", []],
    [{"role": "user", "content": None}], [{"role": "user", "content": 5}], [{"role": "user", "content": {"a": 1}}],
    [{"role": "user", "content": [None, 1, {"type": "text"}, {"type": "text", "text": 5}, "### Task:"]}],
    [{"role": ["user"], "content": "### Task:"}], [{"role": "user", "content": "\u3000" * 5000 + "### Task:"}],
])
async def test_a_task_body_of_odd_shapes_is_never_a_500(tmp_path: Path, messages: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    models = write_models(tmp_path, fake_engine_spec("cold"))
    async with run_gateway(models, task_model="cold") as gw, httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(gw.v1 + "/chat/completions", json={"model": "cold", "messages": messages})
        assert reply.status_code != 500, reply.text
        assert reply.status_code in (200, 503), reply.text
    no_exception_logged(caplog)


@pytest.mark.parametrize("name", ["X-OpenWebUI-Task", "x-openwebui-task", "X-OPENWEBUI-TASK"])
@pytest.mark.parametrize("configured", ["X-OpenWebUI-Task", "x-OPENWEBUI-task"])
async def test_the_task_header_matches_whatever_its_casing(tmp_path: Path, name: str, configured: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("cold"))
    async with run_gateway(models, task_header=configured) as gw, httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(gw.v1 + "/chat/completions", json={"model": "cold", "messages": MESSAGES},
                                  headers={name: "Title_Generation"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_not_ready_for_task"
        assert gw.waker.controller("cold").state is S.STOPPED
        placeholder = await client.post(gw.v1 + "/chat/completions", json={"model": "cold", "messages": MESSAGES},
                                         headers={name: "{{TASK}}"})
        assert placeholder.status_code == 200


async def test_a_stream_queued_for_a_max_concurrent_slot_gets_its_200_and_a_comment_at_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    models = write_models(tmp_path / "models", gated("one", gate, max_concurrent=1, progress="open-webui"))
    async with run_gateway(models, keepalive_interval=0.2, progress_interval=0.2) as gw, \
            httpx.AsyncClient(timeout=30) as first_client, httpx.AsyncClient(timeout=30) as second_client:
        body = {"model": "one", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        async with first_client.stream("POST", gw.v1 + "/chat/completions", json=body) as holder:
            held = holder.aiter_raw()  # kept: a dropped iterator closes the response, and so frees the slot
            await anext(held)  # the first stream holds the only slot while the start is held back
            try:
                async with asyncio.timeout(5), \
                        second_client.stream("POST", gw.v1 + "/chat/completions", json=body) as queued:
                    assert queued.status_code == 200
                    assert (await anext(queued.aiter_raw())).startswith(b": waking one (")
                    assert gw.waker.gate("one").limiter.waiting == 1  # it is queued for the slot, and told so
            finally:
                gate.touch()
