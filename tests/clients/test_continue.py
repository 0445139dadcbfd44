"""Continue's request pattern (VS Code / JetBrains): chat streams on /v1/chat/completions, and tab
autocomplete on /v1/completions with fill-in-the-middle (`prompt` + `suffix`, small `max_tokens`,
`stream: true`), where almost every request is aborted within ~100 ms because the user kept typing.
The gateway must cancel each abandoned engine request, leak nothing, and keep serving."""

import asyncio
import contextlib
import random
from pathlib import Path

import httpx
import openai

from tests.clients.util import data_payloads, requests_total, settled_engine_stats, until
from tests.harness import fake_engine_spec, run_gateway, write_models

PREFIX = "def fibonacci(n: int) -> int:\n    "
SUFFIX = "\n\nprint(fibonacci(10))\n"


def autocomplete_body(model: str, prefix: str) -> dict:
    return {"model": model, "prompt": prefix, "suffix": SUFFIX, "max_tokens": 24, "temperature": 0.01,
            "stop": ["\n\n", "\ndef "], "stream": True}


async def autocomplete(client: httpx.AsyncClient, url: str, body: dict) -> bytes:
    """One autocomplete request. Aborting it mid-response closes its connection (the pool can't reuse
    a half-read one), as an AbortController does to fetch's."""
    async with client.stream("POST", url + "/completions", json=body) as resp:
        assert resp.status_code == 200
        return await resp.aread()


async def test_autocomplete_requests_cancelled_within_100ms_leak_nothing(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("coder", "--token-delay", "0.01", aliases=["qwen-coder"]))
    rng = random.Random(7)
    # One pooled client, as the editor's: a new client per keystroke would take longer than the abort.
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30, limits=limits) as http:
        controller = gw.waker.controller("coder")
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=30)
        # The chat panel warms the model first, as the user asks something.
        warm = await sdk.chat.completions.create(
            model="qwen-coder", messages=[{"role": "user", "content": "what does this file do?"}], max_tokens=2)
        assert warm.choices[0].message.content == " t0 t1"

        async def chat() -> str:
            stream = await sdk.chat.completions.create(
                model="qwen-coder", messages=[{"role": "user", "content": "refactor fibonacci"}],
                max_tokens=80, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        chatting = asyncio.create_task(chat())
        # 50 keystrokes, one autocomplete each; every fifth is left to finish, the others are aborted
        # 20-100 ms after being sent (before the 24 tokens at 10 ms each can all arrive).
        finishing: list[asyncio.Task[bytes]] = []
        aborted: list[asyncio.Task[bytes]] = []
        loop = asyncio.get_running_loop()
        for i in range(50):
            body = autocomplete_body("qwen-coder", PREFIX + "x" * i)
            task = asyncio.create_task(autocomplete(http, gw.v1, body))
            if i % 5 == 4:
                finishing.append(task)
            else:
                aborted.append(task)
                loop.call_later(rng.uniform(0.02, 0.1), task.cancel)
            await asyncio.sleep(0.015)  # typing speed
        completed = await asyncio.wait_for(asyncio.gather(*finishing), timeout=30)
        for task in aborted:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert await asyncio.wait_for(chatting, timeout=30) == "".join(f" t{i}" for i in range(80))

        for raw in completed:
            payloads = data_payloads(raw)
            assert payloads[-1] == "[DONE]"
            assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == "".join(f" t{i}" for i in range(24))
        cancelled_by_client = sum(1 for t in aborted if t.cancelled())
        assert cancelled_by_client >= 30  # most really were aborted mid-flight

        # Nothing leaked: no lease, no waiter (no event marks a counter reaching 0: poll, bounded).
        await until(lambda: controller.in_flight == 0 and controller.waiting == 0, timeout=10,
                    what="in_flight and waiting back to 0")
        # The engine saw the aborts as cancelled streams, and every stream it began has ended.
        stats = await settled_engine_stats(gw, "coder")
        assert stats["streams_cancelled"] > 0
        assert stats["streams_started"] == stats["streams_completed"] + stats["streams_cancelled"]
        assert stats["streams_completed"] >= len(finishing) + 1  # + the chat stream
        assert stats["fim_requests"] >= len(finishing)
        assert await requests_total(gw, "client_gone", "coder") >= stats["streams_cancelled"]
        assert controller.state == "ready" and gw.starts("coder") == 1

        # The next autocomplete, streamed and not, works as usual.
        raw = await autocomplete(http, gw.v1, autocomplete_body("coder", PREFIX))
        assert "".join(p["choices"][0]["text"] for p in data_payloads(raw)[:-1]).startswith(" t0 t1")
        fim = await sdk.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=3)
        assert fim.choices[0].text == " t0 t1 t2"
        assert controller.in_flight == 0
