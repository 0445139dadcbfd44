"""Continue's request pattern (VS Code / JetBrains), as its source has it (docs/clients.md; continuedev/continue
core/autocomplete): chat streams on /v1/chat/completions; tab autocomplete on /v1/completions with the
fill-in-the-middle prompt templated by Continue itself (the model's FIM tokens inside `prompt`, **no `suffix`**),
`stream: true`, a 350 ms debounce, reuse of the completion in flight when the new prefix extends it, aborts
otherwise and cuts at the first newline in single-line mode; embeddings for @codebase with every batch of an
indexing step sent at once.

The first test is harsher than Continue ever is (a request per keystroke, most aborted within ~100 ms, with a
`suffix`, as a provider with native FIM would send): the gateway must cancel each abandoned engine request, leak
nothing, and keep serving. The others follow Continue's real parameters."""

import asyncio
import contextlib
import json
import random
from pathlib import Path

import httpx
import openai

from tests.clients.util import data_payloads, engine_stats, requests_total, settled_engine_stats, until
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


# Continue's Qwen-Coder FIM template (core/autocomplete/templating/AutocompleteTemplate.ts), picked by a model name
# containing "qwen" and "coder"; its stop words follow the template.
QWEN_FIM = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
QWEN_STOP = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
             "<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>", "\n\n", "\r\n\r\n", "/src/",
             "#- coding: utf-8", "```"]
DEBOUNCE = 0.35  # debounceDelay (core/util/parameters.ts)


def continue_fim_body(model: str, prefix: str) -> dict:
    """What Continue's `openai` provider sends for one completion (toCompleteBody): the template in `prompt`."""
    return {"model": model, "prompt": QWEN_FIM.format(prefix=prefix, suffix=SUFFIX), "max_tokens": 24,
            "temperature": 0.01, "top_p": 1, "stop": QWEN_STOP, "stream": True}


async def test_a_templated_fim_prompt_without_suffix_reaches_the_engine_as_continue_sent_it(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("qwen2.5-coder-1.5b", "--token-delay", "0.001",
                                                     "--created", "1700000000", aliases=["autocomplete"]))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as http:
        body = continue_fim_body("qwen2.5-coder-1.5b", PREFIX)
        await gw.waker.warm("qwen2.5-coder-1.5b")  # a cold stream starts with the gateway's keep-alive comments
        via_gateway = await http.post(gw.v1 + "/completions", json=body)
        assert via_gateway.status_code == 200
        api_base = gw.waker.controller("qwen2.5-coder-1.5b").handle.api_base
        direct = await http.post(api_base + "/completions", json=body)
        assert via_gateway.content == direct.content  # nothing added (no suffix), dropped or reframed
        payloads = data_payloads(via_gateway.content)
        assert payloads[-1] == "[DONE]"
        assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == "".join(f" t{i}" for i in range(24))
        stats = await engine_stats(gw, "qwen2.5-coder-1.5b")
        assert stats["fim_requests"] == 0  # the FIM tokens are in the prompt: the engine saw no suffix


async def test_debounced_typing_with_reuse_and_single_line_cuts_leaks_nothing(tmp_path: Path) -> None:
    """Five bursts of typing. After each, once 350 ms have passed without a keystroke, one completion is asked for;
    the next burst either extends what that completion is producing (Continue reuses it: no new request) or not
    (it is aborted and a new one sent); every completion is cut by the client at its first newline."""
    models = write_models(tmp_path, fake_engine_spec("qwen2.5-coder-1.5b", "--token-delay", "0.01"))
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30, limits=limits) as http:
        # The model is warm (idle_timeout 1h in the example): the first completion is not held by a cold start.
        warm = await http.post(gw.v1 + "/completions", json={**continue_fim_body("qwen2.5-coder-1.5b", PREFIX),
                                                              "stream": False})
        assert warm.status_code == 200
        controller = gw.waker.controller("qwen2.5-coder-1.5b")
        sent = 0
        in_flight: asyncio.Task[str] | None = None
        produced = ""

        async def complete(prefix: str) -> str:
            """Streams one completion and stops reading at the first newline (single-line mode's fullStop)."""
            nonlocal produced
            text = ""
            body = continue_fim_body("qwen2.5-coder-1.5b", prefix)
            async with http.stream("POST", gw.v1 + "/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    produced = text
                    if "t5" in text:  # the model's "first newline": the client stops reading here
                        return text
            return text

        prefix = PREFIX
        for burst in range(5):
            await asyncio.sleep(DEBOUNCE)  # the debounce: a request only once typing pauses
            if in_flight is not None and not in_flight.done() and burst % 2 == 1 and produced:
                prefix += produced[:3]  # the user typed what the completion shows: Continue reuses it
                continue
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()  # the new prefix doesn't extend it: aborted
                with contextlib.suppress(asyncio.CancelledError):
                    await in_flight
            prefix += f"x{burst}"
            produced = ""
            in_flight = asyncio.create_task(complete(prefix))
            sent += 1
        assert in_flight is not None
        last = await asyncio.wait_for(in_flight, timeout=30)
        assert last.startswith(" t0 t1")

        await until(lambda: controller.in_flight == 0 and controller.waiting == 0, timeout=10,
                    what="in_flight and waiting back to 0")
        stats = await settled_engine_stats(gw, "qwen2.5-coder-1.5b")
        assert stats["streams_started"] == sent  # a reused completion is not asked for again
        assert stats["streams_started"] == stats["streams_completed"] + stats["streams_cancelled"]
        assert stats["streams_cancelled"] >= 1  # the cut at the first newline ended the engine's stream
        assert gw.starts("qwen2.5-coder-1.5b") == 1


async def test_every_embedding_batch_of_an_indexing_step_sent_at_once_is_answered(tmp_path: Path) -> None:
    """@codebase indexing: Continue sends all batches of a step concurrently (Promise.all), 128 chunks each for the
    `openai` provider. With the engine limited to 2 at a time, the rest wait for a slot and every batch is answered,
    in order of its inputs."""
    models = write_models(tmp_path, fake_engine_spec("embed", max_concurrent=2))
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)
        batches = [[f"chunk {b}-{i}" for i in range(128)] for b in range(8)]
        answers = await asyncio.gather(*(sdk.embeddings.create(model="embed", input=batch) for batch in batches))
        for answer in answers:
            assert [d.index for d in answer.data] == list(range(128))
        assert gw.starts("embed") == 1
        assert gw.waker.controller("embed").in_flight == 0
