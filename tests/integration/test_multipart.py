"""Uploads routed by their form's `model` field (issue 19). The proxy read every body as JSON, so the OpenAI SDK's
audio transcriptions and translations and its image edits were refused with "not valid JSON". Now the form's
`model` field routes them: the file reaches the engine byte for byte (the fake engine hashes what it reads), an
alias is written over the field, a 20 MB upload within max_body_bytes is held once, a form that can't be routed is
a 400 and one past the limit a 413, with nothing started, and a cold model is started by an upload."""

import hashlib
import json
import random
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.chaos.util import assert_openai_error
from tests.clients.util import engine_stats, sse_events
from tests.harness import FAKE_ENGINE, fake_engine_spec, run_gateway, write_models


def audio_bytes(size: int, seed: int = 19) -> bytes:
    return random.Random(seed).randbytes(size)


def heard(audio: bytes, kind: str = "transcription") -> str:
    """What the fake engine answers for an upload (tests/fake_engine.py `add_openai_endpoints`)."""
    return f"{kind} of {len(audio)} bytes sha256 {hashlib.sha256(audio).hexdigest()[:16]}"


def form(data: dict[str, str], files: dict[str, tuple[str, bytes, str]],
         boundary: str = "sparkgate-test-boundary") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body as httpx (the OpenAI SDK's encoder) writes it, and its Content-Type header."""
    content_type = f"multipart/form-data; boundary={boundary}"
    request = httpx.Request("POST", "http://x/", data=data, files=files, headers={"content-type": content_type})
    return request.read(), {"content-type": content_type}


async def uploads(gw: Any, model: str) -> list[dict[str, Any]]:
    return (await engine_stats(gw, model)).get("uploads", [])


def sdk(gw: Any, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=120, **options)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's translations.create
async def test_the_sdks_transcription_and_translation_reach_the_engine_byte_for_byte(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("whisper"))
    audio = audio_bytes(300_000)
    async with run_gateway(models) as gw:
        client = sdk(gw)
        text = await client.audio.transcriptions.create(file=("speech.wav", audio, "audio/wav"), model="whisper",
                                                        language="de", prompt="Grüße")
        translated = await client.audio.translations.create(file=("speech.wav", audio, "audio/wav"), model="whisper",
                                                            response_format="text")
        received = await uploads(gw, "whisper")
    assert text.text == heard(audio)
    assert translated.strip() == heard(audio, "translation")
    digest = hashlib.sha256(audio).hexdigest()
    assert [(u["path"], u["fields"], [(f["name"], f["filename"], f["size"], f["sha256"]) for f in u["files"]])
            for u in received] == [
        ("/v1/audio/transcriptions", {"model": "whisper", "language": "de", "prompt": "Grüße"},
         [("file", "speech.wav", len(audio), digest)]),
        ("/v1/audio/translations", {"model": "whisper", "response_format": "text"},
         [("file", "speech.wav", len(audio), digest)]),
    ]


async def test_an_image_edit_from_the_sdk_is_routed_by_its_form(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("painter"))
    image = b"\x89PNG\r\n\x1a\n" + audio_bytes(50_000, seed=7)
    async with run_gateway(models) as gw:
        edited = await sdk(gw).images.edit(image=("in.png", image, "image/png"), prompt="add a hat", model="painter")
        [received] = await uploads(gw, "painter")
    assert edited.data and edited.data[0].b64_json
    assert received["fields"]["prompt"] == "add a hat" and received["fields"]["model"] == "painter"
    assert [(f["size"], f["sha256"]) for f in received["files"]] == [(len(image), hashlib.sha256(image).hexdigest())]


async def test_an_alias_is_written_over_the_model_field_and_nothing_else_changes(tmp_path: Path) -> None:
    # The fake engine answers 404 to any model but its own: the 200 says it got "whisper", not the alias.
    models = write_models(tmp_path, fake_engine_spec("whisper", aliases=["whisper-1", "w"]))
    audio = audio_bytes(200_000, seed=3)
    async with run_gateway(models) as gw:
        client = sdk(gw)
        for alias in ("whisper-1", "w"):  # a longer and a shorter name than the engine's: the bytes after it move
            assert (await client.audio.transcriptions.create(
                file=("a.wav", audio, "audio/wav"), model=alias, language="en")).text == heard(audio)
        received = await uploads(gw, "whisper")
    assert [u["fields"] for u in received] == [{"model": "whisper", "language": "en"}] * 2
    assert [f["sha256"] for u in received for f in u["files"]] == [hashlib.sha256(audio).hexdigest()] * 2


async def test_a_20_mb_upload_within_the_limit_arrives_intact_and_is_held_once(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("whisper"))
    audio = audio_bytes(20 * 1024 * 1024, seed=20)
    body, headers = form({"model": "whisper"}, {"file": ("long.wav", audio, "audio/wav")})

    async def pieces() -> AsyncIterator[bytes]:  # the client holds nothing but the body it was given
        view = memoryview(body)
        for start in range(0, len(view), 64 * 1024):
            yield bytes(view[start:start + 64 * 1024])

    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=120) as client:
        through_sdk = await sdk(gw).audio.transcriptions.create(file=("long.wav", audio, "audio/wav"), model="whisper")
        assert through_sdk.text == heard(audio)
        # The same upload again, streamed by a client that holds it once: what the process allocates meanwhile is
        # the gateway's buffer and little else. Reading it as a list of chunks and joining them, then writing it to
        # the engine in one write whose unsent part the event loop copies, held it two to three times.
        tracemalloc.start()
        try:
            answer = await client.post(gw.v1 + "/audio/transcriptions", content=pieces(),
                                       headers={**headers, "content-length": str(len(body))})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        received = await uploads(gw, "whisper")
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == heard(audio)
    assert [(f["size"], f["sha256"]) for u in received for f in u["files"]] == \
        [(len(audio), hashlib.sha256(audio).hexdigest())] * 2
    assert peak < 1.3 * len(body), f"{peak / len(body):.2f} times the upload allocated while it was proxied"


BOUNDARY = "XyZ"


def part(name: str, value: bytes, extra: str = "") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n').encode() + value + b"\r\n"


FILE = part("file", b"RIFF....WAVE", '; filename="a.wav"')
END = f"--{BOUNDARY}--\r\n".encode()
UNROUTABLE = {
    "no model": (FILE + END, "missing_model"),
    "empty model": (part("model", b"") + FILE + END, "missing_model"),
    "model twice": (part("model", b"whisper") + FILE + part("model", b"other") + END, "invalid_multipart"),
    "model as a file": (part("model", b"whisper", '; filename="m.txt"') + FILE + END, "invalid_multipart"),
    "model not utf-8": (part("model", b"wh\xffsper") + FILE + END, "invalid_multipart"),
    "no closing delimiter": (part("model", b"whisper") + FILE, "invalid_multipart"),
    "not a form": (b'{"model": "whisper"}', "invalid_multipart"),
    "stream not a boolean": (part("model", b"whisper") + part("stream", b"yes") + FILE + END, "invalid_type"),
    "unknown model": (part("model", b"nobody") + FILE + END, "model_not_found"),
}


@pytest.mark.parametrize("case", list(UNROUTABLE), ids=list(UNROUTABLE))
async def test_a_form_that_cannot_be_routed_is_refused_and_starts_nothing(tmp_path: Path, case: str) -> None:
    body, code = UNROUTABLE[case]
    models = write_models(tmp_path, fake_engine_spec("whisper"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/audio/transcriptions", content=body,
                                   headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert answer.status_code == (404 if code == "model_not_found" else 400), answer.text
        assert assert_openai_error(answer.json())["code"] == code
        no_boundary = await client.post(gw.v1 + "/audio/transcriptions", content=body,
                                        headers={"content-type": "multipart/form-data"})
        assert no_boundary.status_code == 400 and no_boundary.json()["error"]["code"] == "invalid_multipart"
        assert gw.starts("whisper") == 0


async def test_an_upload_past_max_body_bytes_is_a_413_and_starts_nothing(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("whisper"))
    audio = audio_bytes(2 * 1024 * 1024)
    body, headers = form({"model": "whisper"}, {"file": ("a.wav", audio, "audio/wav")})

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: found too large while reading
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    async with run_gateway(models, max_body_bytes=1024 * 1024) as gw, httpx.AsyncClient(timeout=30) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk(gw).audio.transcriptions.create(file=("a.wav", audio, "audio/wav"), model="whisper")
        assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
        answer = await client.post(gw.v1 + "/audio/transcriptions", content=chunked(), headers=headers)
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
        assert gw.starts("whisper") == 0


async def test_a_cold_model_is_started_by_an_upload(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("whisper", "--ready-after", "0.5"))
    audio = audio_bytes(500_000, seed=5)
    async with run_gateway(models) as gw:
        assert gw.waker.controller("whisper").state == "stopped"
        text = await sdk(gw).audio.transcriptions.create(file=("a.wav", audio, "audio/wav"), model="whisper")
        assert text.text == heard(audio)
        assert gw.starts("whisper") == 1 and gw.waker.controller("whisper").state == "ready"
        [received] = await uploads(gw, "whisper")
    assert received["files"][0]["sha256"] == hashlib.sha256(audio).hexdigest()


async def test_a_sleeping_model_is_woken_by_an_upload(tmp_path: Path) -> None:
    # The fake engine behind the vLLM adapter: `vllm serve` flags, vLLM's sleep routes, its transcription route.
    whisper = {"name": "whisper", "engine": "vllm", "model": "org/fake-whisper",
               "command": [sys.executable, FAKE_ENGINE], "start_timeout": "20s", "stop_timeout": "5s", "min_uptime": 0,
               "memory_gb": 40, "sleep_memory_gb": 4, "idle_action": "sleep"}
    models = write_models(tmp_path, whisper)
    audio = audio_bytes(400_000, seed=8)
    # A budget of its own: the machine's free memory (probed by default) is not this test's business.
    async with run_gateway(models, nodes={"local": {"total_gb": 100, "reserve_gb": 0, "memory_probe": "none"}}) as gw:
        client = sdk(gw)
        assert (await client.audio.transcriptions.create(file=("a.wav", audio, "audio/wav"),
                                                         model="whisper")).text == heard(audio)
        assert gw.waker.sleep("whisper")
        await gw.waker.events.wait_for(lambda e: e.model == "whisper" and e.target == "sleeping", 10)
        again = await client.audio.transcriptions.create(file=("b.wav", audio[::-1], "audio/wav"), model="whisper")
        assert again.text == heard(audio[::-1])
        assert gw.waker.controller("whisper").state == "ready" and gw.starts("whisper") == 1
        assert [e for e in gw.waker.events.recent("whisper") if e.kind == "transition" and e.target == "waking"]
        received = await uploads(gw, "whisper")
    assert [u["files"][0]["sha256"] for u in received] == [hashlib.sha256(a).hexdigest() for a in (audio, audio[::-1])]


async def test_a_streamed_transcription_waiting_for_a_cold_model_gets_keep_alives_then_the_engines_events(
        tmp_path: Path) -> None:
    # The form's `stream` field ("true", as the SDKs write it) makes it a stream: kept alive while the model starts.
    models = write_models(tmp_path, fake_engine_spec("whisper", "--ready-after", "1"))
    audio = audio_bytes(100_000, seed=6)
    async with run_gateway(models, keepalive_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(gw.v1 + "/audio/transcriptions", data={"model": "whisper", "stream": "true"},
                                   files={"file": ("a.wav", audio, "audio/wav")})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.content)
    comments = [e for e in events if e.startswith(":")]
    assert comments and events[:len(comments)] == comments, events[:3]  # keep-alives first, then the engine's
    chunks = [e for e in events[len(comments):] if e != "data: [DONE]"]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[len("data: "):])["choices"][0]["delta"]["content"] for e in chunks) == heard(audio)


async def test_a_keyless_gateways_door_lets_forms_through_to_the_upload_endpoints_only(tmp_path: Path) -> None:
    # Without keys the door refuses non-JSON bodies (a web page can post a form without a preflight); uploads are
    # forms, so they pass on the endpoints that take them, and nowhere else.
    models = write_models(tmp_path, fake_engine_spec("whisper"))
    body, headers = form({"model": "whisper"}, {"file": ("a.wav", b"RIFF", "audio/wav")})
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        upload = await client.post(gw.v1 + "/audio/transcriptions", content=body, headers=headers)
        chat = await client.post(gw.v1 + "/chat/completions", content=body, headers=headers)
        foreign = await client.post(gw.v1 + "/audio/transcriptions", content=body,
                                    headers={**headers, "origin": "http://evil.example"})
    assert upload.status_code == 200, upload.text
    assert (chat.status_code, chat.json()["error"]["code"]) == (403, "json_required")
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (403, "origin_not_allowed")
