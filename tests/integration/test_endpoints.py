"""Every OpenAI-style endpoint the engines serve, routed by model (issue 19): text to speech (audio bytes relayed as
bytes, never taken for SSE), image generation, vLLM's rerank and score, and Anthropic's Messages API that vLLM and
llama.cpp serve at /v1/messages (its `event:` lines relayed untouched; the keep-alive comments sent while a model
starts are skipped by Anthropic's SDKs as by OpenAI's; an error after them is Anthropic's `event: error`). The fake
engine answers in each server's shape (tests/fake_engine.py `add_openai_endpoints`)."""

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.clients.util import sse_events
from tests.fake_engine import speech_audio
from tests.harness import fake_engine_spec, run_gateway, write_models

ANTHROPIC_EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                    "content_block_delta", "content_block_stop", "message_delta", "message_stop"]


def anthropic_events(raw: bytes) -> list[tuple[str | None, Any]]:
    """The events of a stream as Anthropic's SDK decodes them (anthropic-sdk-python src/anthropic/_streaming.py,
    SSEDecoder): comment lines skipped, `event:` and `data:` gathered until a blank line; (name, JSON data)."""
    events: list[tuple[str | None, Any]] = []
    name: str | None = None
    data: list[str] = []
    for line in raw.decode().split("\n"):
        if not line:
            if name or data:
                events.append((name, json.loads("\n".join(data)) if data else None))
            name, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
    return events


async def test_speech_from_the_sdk_streams_the_audio_back_byte_for_byte(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("voice", "--token-delay", "0.01"))
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)
        async with sdk.audio.speech.with_streaming_response.create(model="voice", voice="alloy",
                                                                   input="hello there") as speech:
            content_type = speech.headers["content-type"]
            pieces = [piece async for piece in speech.iter_bytes()]
    assert content_type == "audio/mpeg"
    assert b"".join(pieces) == speech_audio("hello there")


async def test_raw_audio_streamed_by_a_cold_model_gets_no_keep_alives_in_it(tmp_path: Path) -> None:
    # stream_format "audio" asks for raw audio bytes even with stream=true (vLLM-Omni): the keep-alive comments a
    # stream gets while its model starts would be written into the audio, under an SSE content type.
    models = write_models(tmp_path, fake_engine_spec("voice", "--ready-after", "1"))
    request = {"model": "voice", "input": "raw", "voice": "alloy", "response_format": "pcm", "stream": True,
               "stream_format": "audio"}
    async with run_gateway(models, keepalive_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/audio/speech", json=request)
        assert gw.starts("voice") == 1
    assert (answer.status_code, answer.headers["content-type"]) == (200, "audio/pcm")
    assert answer.content == speech_audio("raw")


async def test_speech_as_sse_is_a_stream_kept_alive_while_its_model_starts(tmp_path: Path) -> None:
    # stream_format "sse" streams speech.audio.delta events, `stream` or not: kept alive like any stream.
    models = write_models(tmp_path, fake_engine_spec("voice", "--ready-after", "1"))
    request = {"model": "voice", "input": "sse", "voice": "alloy", "response_format": "pcm", "stream_format": "sse"}
    async with run_gateway(models, keepalive_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/audio/speech", json=request)
    events = sse_events(answer.content)
    comments = [e for e in events if e.startswith(":")]
    assert comments and events[:len(comments)] == comments, events[:2]
    payloads = [json.loads(e[len("data: "):]) for e in events[len(comments):]]
    assert [p["type"] for p in payloads][-1] == "speech.audio.done"
    audio = b"".join(base64.b64decode(p["audio"]) for p in payloads if p["type"] == "speech.audio.delta")
    assert audio == speech_audio("sse")


async def test_images_from_the_sdk_are_routed_by_model(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("painter", aliases=["dall-e-3"]))
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)
        images = await sdk.images.generate(model="dall-e-3", prompt="a cat", n=2, response_format="b64_json")
    assert len(images.data) == 2
    assert all(base64.b64decode(image.b64_json or "").startswith(b"\x89PNG") for image in images.data)


@pytest.mark.parametrize("flavor", ["generic", "vllm", "llamacpp"])
async def test_rerank_is_routed_by_model_in_each_engines_shape(tmp_path: Path, flavor: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("ranker", "--flavor", flavor, aliases=["rerank-alias"]))
    request = {"model": "rerank-alias", "query": "red apple", "documents": ["a blue car", "red apple pie", "an apple"],
               "top_n": 2}
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/rerank", json=request)
    assert answer.status_code == 200, answer.text
    ranked = answer.json()
    assert ranked["model"] == "ranker"  # the alias was replaced by the engine's name
    assert [(r["index"], r["relevance_score"]) for r in ranked["results"]] == [(1, 1.0), (2, 0.5)]
    if flavor != "llamacpp":  # llama.cpp returns the text only in its TEI format
        assert [r["document"]["text"] for r in ranked["results"]] == ["red apple pie", "an apple"]


@pytest.mark.parametrize("flavor", ["generic", "vllm"])
async def test_score_is_routed_by_model(tmp_path: Path, flavor: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("scorer", "--flavor", flavor))
    request = {"model": "scorer", "text_1": "red apple", "text_2": ["a red car", "red apple", "pear"]}
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/score", json=request)
    assert answer.status_code == 200, answer.text
    assert [(d["index"], d["object"], d["score"]) for d in answer.json()["data"]] == \
        [(0, "score", 0.5), (1, "score", 1.0), (2, "score", 0.0)]


@pytest.mark.parametrize("flavor", ["generic", "vllm", "llamacpp"])
async def test_an_anthropic_messages_stream_is_relayed_untouched(tmp_path: Path, flavor: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("claude-local", "--flavor", flavor))
    request = {"model": "claude-local", "max_tokens": 3, "stream": True,
               "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        whole = await client.post(gw.v1 + "/messages", json={**request, "stream": False})
        through = await client.post(gw.v1 + "/messages", json=request)
        direct = await client.post(gw.waker.controller("claude-local").handle.root_url + "/v1/messages", json=request)
    assert whole.json()["content"] == [{"type": "text", "text": " t0 t1 t2"}]
    assert through.headers["content-type"].startswith("text/event-stream")
    assert through.content == direct.content  # byte for byte: the gateway adds, drops and reframes nothing
    assert [name for name, _ in anthropic_events(through.content)] == ANTHROPIC_EVENTS


async def test_a_messages_stream_waiting_for_a_cold_model_reads_as_anthropics_events(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("claude-local", "--ready-after", "1"))
    request = {"model": "claude-local", "max_tokens": 3, "stream": True,
               "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(models, keepalive_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/messages", json=request)
    assert answer.content.startswith(b":")  # kept alive while it started: comments, which the SDK skips
    events = anthropic_events(answer.content)
    assert [name for name, _ in events] == ANTHROPIC_EVENTS
    assert "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta") == " t0 t1 t2"


async def test_a_messages_stream_whose_model_fails_to_start_ends_with_anthropics_error_event(tmp_path: Path) -> None:
    # After the 200 and the keep-alives, the failure travels in the stream. Anthropic's SDKs raise on `event: error`
    # and skip events without a name: OpenAI's `data: {"error": ...}` ended the stream silently.
    models = write_models(tmp_path, fake_engine_spec("claude-local", "--never-ready", start_timeout="1s"))
    request = {"model": "claude-local", "max_tokens": 3, "stream": True,
               "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(models, keepalive_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/messages", json=request)
    assert answer.status_code == 200 and answer.content.startswith(b":")
    [(name, data)] = anthropic_events(answer.content)
    assert name == "error" and data["type"] == "error"
    assert data["error"]["type"] in ("overloaded_error", "api_error") and "claude-local" in data["error"]["message"]
