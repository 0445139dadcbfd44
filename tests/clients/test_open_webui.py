"""Open WebUI's request pattern: it lists /v1/models to fill its model picker, streams the chat answer
from a big model, and meanwhile sends its background tasks (title, tags, follow-up suggestions:
short non-streaming chat completions) to a small "task model". Its HTTP client gives up on a read
that stays silent too long, which the gateway's SSE keep-alive comments prevent during a cold start.
"""

import asyncio
import itertools
import time
from pathlib import Path

import httpx
import openai

from tests.clients.util import data_payloads, engine_stats, sse_events
from tests.harness import fake_engine_spec, run_gateway, write_models

BACKGROUND_TASKS = {
    "title": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.",
    "tags": "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history.",
    "follow_ups": "### Task:\nSuggest 3-5 relevant follow-up questions the user might naturally ask next.",
}


async def test_models_list_has_the_shape_open_webui_reads(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", aliases=["llama-big", "brain"], memory_gb=40),
                          fake_engine_spec("small", aliases=["task"]))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=10) as client:
        # Open WebUI sends its configured key (any string when the gateway has none) and reads the list.
        resp = await client.get(gw.v1 + "/models", headers={"Authorization": "Bearer sk-unused"})
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/json")
        listing = resp.json()
        assert listing["object"] == "list"
        assert isinstance(listing["data"], list)
        ids = [m["id"] for m in listing["data"]]
        assert sorted(ids) == ["big", "brain", "llama-big", "small", "task"]  # every model and alias, once
        for entry in listing["data"]:
            assert entry["object"] == "model"
            assert isinstance(entry["id"], str) and entry["id"]
            assert isinstance(entry["created"], int) and entry["created"] > 0
            assert isinstance(entry["owned_by"], str) and entry["owned_by"]
        by_id = {m["id"]: m for m in listing["data"]}
        assert by_id["llama-big"]["alias_of"] == "big" and by_id["task"]["alias_of"] == "small"
        assert "alias_of" not in by_id["big"]
        assert gw.starts("big") == gw.starts("small") == 0  # listing starts nothing
        # the SDK (which Open WebUI's OpenAI connection check mirrors) reads it too
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-unused", max_retries=0)
        assert sorted([m.id async for m in sdk.models.list()]) == sorted(ids)
        assert all(m.owned_by == "sparkgate" for m in (await sdk.models.list()).data)


async def test_background_tasks_on_a_small_model_finish_while_the_big_one_streams(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", "--token-delay", "0.05", aliases=["llama-big"]),
                          fake_engine_spec("small", aliases=["task"]))
    async with run_gateway(models) as gw:
        # The task model is kept warm (pinned and preloaded, as docs/clients.md advises): a background task never
        # starts a model, so a cold one would refuse the tasks with a 503 (gateway/tasks.py).
        await gw.waker.warm("small")
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-unused", max_retries=0, timeout=30)
        history = [{"role": "user", "content": "Explain the DGX Spark's unified memory in detail."}]
        stream = await sdk.chat.completions.create(model="llama-big", messages=history, max_tokens=60, stream=True)
        pieces: list[str] = []
        arrivals: list[float] = []
        finish_reasons: list[str | None] = []
        first_token = asyncio.Event()

        async def read_stream() -> float:
            async for chunk in stream:
                arrivals.append(time.monotonic())
                pieces.append(chunk.choices[0].delta.content or "")
                finish_reasons.append(chunk.choices[0].finish_reason)
                first_token.set()
            return time.monotonic()

        async def background(task: str, prompt: str) -> tuple[str, float]:
            reply = await sdk.chat.completions.create(
                model="task", max_tokens=8, stream=False,
                messages=[{"role": "user", "content": f"{prompt}\n<chat_history>\nUSER: {history[0]['content']}"}])
            return reply.choices[0].message.content or "", time.monotonic()

        reading = asyncio.create_task(read_stream())
        await asyncio.wait_for(first_token.wait(), timeout=20)  # the answer is under way
        # Open WebUI fires its background tasks while the answer streams, to its warm task model.
        results = await asyncio.gather(*(background(task, prompt) for task, prompt in BACKGROUND_TASKS.items()))
        stream_ended = await asyncio.wait_for(reading, timeout=30)

        assert all(text == " t0 t1 t2 t3 t4 t5 t6 t7" for text, _ in results)
        assert all(done < stream_ended for _, done in results), "background answers came after the stream ended"
        # the stream was not disturbed: every token, in order, ended properly, without a stall
        assert "".join(pieces) == "".join(f" t{i}" for i in range(60))
        assert finish_reasons[-1] == "length"
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(gaps) < 1.0, f"the stream stalled for {max(gaps):.2f}s"
        assert gw.starts("big") == gw.starts("small") == 1
        assert (await engine_stats(gw, "small"))["requests"] == len(BACKGROUND_TASKS)
        big = await engine_stats(gw, "big")
        assert big["streams_completed"] == 1 and big["streams_cancelled"] == 0


async def test_cold_start_longer_than_the_client_read_timeout_is_kept_alive(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", "--ready-after", "2"))
    async with run_gateway(models, keepalive_interval=0.3) as gw:
        # Open WebUI's client: a read timeout (1 s) shorter than the engine's start (2 s).
        timeout = httpx.Timeout(connect=5, read=1, write=5, pool=5)
        body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
        began = time.monotonic()
        received = b""
        async with httpx.AsyncClient(timeout=timeout) as client, \
                client.stream("POST", gw.v1 + "/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for piece in resp.aiter_bytes():  # never silent for 1 s: no ReadTimeout
                received += piece
        assert time.monotonic() - began >= 1.5  # it really waited through the cold start
        events = sse_events(received)
        comments = [e for e in events if e.startswith(":")]
        data = [e for e in events if e.startswith("data: ")]
        assert len(comments) + len(data) == len(events)
        assert len(comments) >= 3 and all(c.startswith(": waking big (") for c in comments)
        first_data = events.index(data[0])
        assert events[:first_data] == comments, "keep-alive comments come first, then only the real stream"
        payloads = data_payloads(received)
        assert payloads[-1] == "[DONE]"
        assert "".join(p["choices"][0]["delta"]["content"] for p in payloads[:-1]) == " t0 t1 t2 t3 t4"
        assert gw.starts("big") == 1
