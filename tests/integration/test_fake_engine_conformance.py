"""The flavoured fake engines (tests/fake_engine.py --flavor ...) behave as the real engines do where the
gateway depends on it. Each test pins one upstream behaviour; the sources are cited in tests/fake_engine.py
and their commits in /work/notes/issue14-upstream-facts.md. Tests of the gateway build on these fakes, so a
fake that drifts from its engine would make them prove nothing.
"""

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest

from tests.harness import FAKE_ENGINE

T = TypeVar("T")
NAME = "m"  # the served model name every test uses
REAL = " t0 t1"  # what the model answers to max_tokens=2 with intact weights
GARBAGE = "!!"  # what it answers with garbage weights (vLLM #29341)
LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
SGLANG_FAST_HEALTH = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}
DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 20.0) -> T:
    """Poll `probe` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


@dataclass
class Engine:
    proc: asyncio.subprocess.Process
    port: int
    client: httpx.AsyncClient

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path)

    async def post(self, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.client.post(path, json=json, **kwargs)

    async def stats(self) -> dict[str, Any]:
        return (await self.get("/stats")).json()

    async def sleep_log(self) -> list[str]:
        return (await self.get("/sleep_log")).json()

    async def chat(self, max_tokens: int = 2) -> httpx.Response:
        return await self.post("/v1/chat/completions", {"model": NAME, "messages": [], "max_tokens": max_tokens})

    async def output(self) -> str:
        reply = await self.chat()
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    async def first_answer(self, path: str = "/health") -> httpx.Response:
        """The first HTTP answer on `path`, once the engine accepts connections."""

        async def probe() -> httpx.Response | None:
            try:
                return await self.get(path)
            except httpx.ConnectError:
                return None

        return await eventually(probe)

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


@contextlib.asynccontextmanager
async def engine(*flags: str, env: dict[str, str] | None = None) -> AsyncIterator[Engine]:
    """tests/fake_engine.py as a process on a free port; ended (SIGKILL) on the way out if still running."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, FAKE_ENGINE, "--port", str(port), *flags,
        env={**os.environ, **(env or {})}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Engine(proc, port, client)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def vllm(*flags: str) -> tuple[str, ...]:
    return ("--flavor", "vllm", "org/weights", "--served-model-name", NAME, *flags)


def sglang(*flags: str) -> tuple[str, ...]:
    return ("--flavor", "sglang", "--model-path", "/models/weights", "--served-model-name", NAME,
            "--mem-fraction-static", "0.5", *flags)


async def wait_line(engine: Engine, text: str) -> None:
    """Read the engine's stdout until a line containing `text` (what it says as it gets there)."""
    assert engine.proc.stdout is not None
    while True:
        line = await asyncio.wait_for(engine.proc.stdout.readline(), 20)
        assert line, f"the engine exited before saying {text!r}"
        if text in line.decode():
            return


async def refused_while_loading(engine: Engine) -> None:
    """While it loads, the port is taken (bound) yet connections are refused: nothing listens."""
    await wait_line(engine, "loading weights")
    with pytest.raises(httpx.ConnectError):
        await engine.get("/health")
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", engine.port))


@dataclass
class Stream:
    """A streamed completion read in the background: `started` once the first token arrived."""

    task: asyncio.Task[tuple[list[str], Exception | None]]
    started: asyncio.Event

    async def result(self) -> tuple[list[str], Exception | None]:
        return await asyncio.wait_for(self.task, 30)


def stream(engine: Engine, max_tokens: int) -> Stream:
    started = asyncio.Event()

    async def read() -> tuple[list[str], Exception | None]:
        lines: list[str] = []
        body = {"model": NAME, "messages": [], "max_tokens": max_tokens, "stream": True}
        try:
            async with engine.client.stream("POST", "/v1/chat/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        except httpx.TransportError as e:  # the engine cut the stream or died
            return lines, e
        return lines, None

    return Stream(asyncio.create_task(read()), started)


async def test_generic_flavor_keeps_its_stats_fields() -> None:
    async with engine("--model", NAME) as e:
        await e.first_answer()
        assert set(await e.stats()) == {"requests", "streams_started", "streams_completed", "streams_cancelled",
                                        "hung", "fim_requests", "tool_calls", "pid"}


# vLLM


async def test_vllm_refuses_connections_while_loading_then_health_is_200() -> None:
    async with engine(*vllm("--ready-after", "2")) as e:
        await refused_while_loading(e)
        health = await e.first_answer()
        assert health.status_code == 200 and health.content == b""  # never a 503: it was not listening
        assert (await e.get("/v1/models")).json()["data"][0]["id"] == NAME


@pytest.mark.parametrize(("flags", "env", "status"), [
    (("--enable-sleep-mode",), DEV_MODE, 200),
    ((), DEV_MODE, 404),
    (("--enable-sleep-mode",), {"VLLM_SERVER_DEV_MODE": "0"}, 404),
])
async def test_vllm_dev_routes_need_dev_mode_and_sleep_mode(flags: tuple[str, ...], env: dict[str, str],
                                                            status: int) -> None:
    async with engine(*vllm(*flags), env=env) as e:
        await e.first_answer()
        assert (await e.get("/is_sleeping")).status_code == status
        assert (await e.post("/sleep?level=1")).status_code == status
        assert (await e.post("/reset_prefix_cache")).status_code == status


async def test_vllm_health_is_200_while_asleep_and_is_sleeping_holds_until_every_tag_is_woken() -> None:
    async with engine(*vllm("--enable-sleep-mode"), env=DEV_MODE) as e:
        await e.first_answer()
        assert (await e.get("/is_sleeping")).json() == {"is_sleeping": False}
        slept = await e.post("/sleep?level=1&mode=wait")
        assert slept.status_code == 200 and slept.content == b""
        assert (await e.get("/health")).status_code == 200  # /health says nothing about sleep
        assert (await e.get("/is_sleeping")).json() == {"is_sleeping": True}
        await e.post("/wake_up?tags=weights")
        assert (await e.get("/is_sleeping")).json() == {"is_sleeping": True}
        await e.post("/wake_up?tags=kv_cache")
        assert (await e.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert await e.sleep_log() == ["sleep level=1 mode=wait", "wake_up tags=weights", "wake_up tags=kv_cache"]


async def test_vllm_level_one_sleep_then_wake_answers_the_real_output() -> None:
    async with engine(*vllm("--enable-sleep-mode"), env=DEV_MODE) as e:
        await e.first_answer()
        assert await e.output() == REAL
        await e.post("/sleep?level=1")
        await e.post("/wake_up")
        assert await e.output() == REAL
        assert await e.sleep_log() == ["sleep level=1", "wake_up"]


async def test_vllm_level_two_wake_without_reload_answers_garbage_with_200() -> None:
    async with engine(*vllm("--enable-sleep-mode"), env=DEV_MODE) as e:
        await e.first_answer()
        await e.post("/sleep?level=2")
        await e.post("/wake_up")
        assert (await e.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert await e.output() == GARBAGE  # silently: 200, awake, wrong
        assert (await e.stats())["garbage_answers"] == 1
        # The documented level 2 wake: weights, reload_weights, then the KV cache.
        await e.post("/sleep?level=2")
        await e.post("/wake_up?tags=weights")
        reloaded = await e.post("/collective_rpc", {"method": "reload_weights"})
        assert reloaded.json() == {"results": [None]}
        await e.post("/wake_up?tags=kv_cache")
        await e.post("/reset_prefix_cache")
        assert await e.output() == REAL
        assert await e.sleep_log() == [
            "sleep level=2", "wake_up", "sleep level=2", "wake_up tags=weights", "collective_rpc reload_weights",
            "wake_up tags=kv_cache", "reset_prefix_cache"]


async def test_vllm_collective_rpc_without_a_method_is_400() -> None:
    async with engine(*vllm("--enable-sleep-mode"), env=DEV_MODE) as e:
        await e.first_answer()
        refused = await e.post("/collective_rpc", {"args": []})
        assert refused.status_code == 400 and refused.json() == {"detail": "Missing 'method' in request body"}


async def test_vllm_request_while_asleep_is_queued_until_the_wake() -> None:
    async with engine(*vllm("--enable-sleep-mode"), env=DEV_MODE) as e:
        await e.first_answer()
        await e.post("/sleep?level=1")
        waiting = asyncio.create_task(e.output())
        await eventually(lambda: _stat_is(e, "queued_while_asleep", 1))
        assert not waiting.done()  # accepted, not answered: no 503 from a sleeping vLLM
        await e.post("/wake_up")
        assert await asyncio.wait_for(waiting, 20) == REAL


async def test_vllm_sleep_in_wait_mode_lets_the_request_in_flight_finish_first() -> None:
    async with engine(*vllm("--enable-sleep-mode", "--token-delay", "0.02"), env=DEV_MODE) as e:
        await e.first_answer()
        s = stream(e, 20)
        await asyncio.wait_for(s.started.wait(), 20)
        assert (await e.post("/sleep?level=1&mode=wait")).status_code == 200
        stats = await e.stats()
        assert stats["streams_completed"] == 1 and stats["in_flight"] == 0 and stats["is_sleeping"]
        lines, error = await s.result()
        assert error is None and lines[-1] == "data: [DONE]"


async def test_vllm_sleep_in_the_default_abort_mode_aborts_the_request_in_flight() -> None:
    async with engine(*vllm("--enable-sleep-mode", "--token-delay", "0.05"), env=DEV_MODE) as e:
        await e.first_answer()
        s = stream(e, 200)
        await asyncio.wait_for(s.started.wait(), 20)
        assert (await e.post("/sleep?level=1")).status_code == 200
        lines, _ = await s.result()
        assert "data: [DONE]" not in lines
        assert (await e.stats())["aborted"] == 1


async def test_vllm_shutdown_timeout_drains_the_request_in_flight_on_sigterm() -> None:
    async with engine(*vllm("--shutdown-timeout", "20", "--token-delay", "0.05")) as e:
        await e.first_answer()
        s = stream(e, 30)
        await asyncio.wait_for(s.started.wait(), 20)
        e.proc.send_signal(signal.SIGTERM)

        async def refused_as_draining() -> bool:
            return (await e.chat(max_tokens=1)).status_code == 503

        await eventually(refused_as_draining)  # new requests are refused at once
        lines, error = await s.result()
        assert error is None and lines[-1] == "data: [DONE]"
        assert await asyncio.wait_for(e.proc.wait(), 20) == 0


async def test_vllm_sigterm_without_shutdown_timeout_aborts_the_request_in_flight() -> None:
    async with engine(*vllm("--token-delay", "0.05")) as e:
        await e.first_answer()
        s = stream(e, 200)
        await asyncio.wait_for(s.started.wait(), 20)
        e.proc.send_signal(signal.SIGTERM)
        lines, _ = await s.result()
        assert "data: [DONE]" not in lines
        await asyncio.wait_for(e.proc.wait(), 20)


async def _stat_is(e: Engine, key: str, value: Any) -> bool:
    return (await e.stats())[key] == value


# SGLang


async def test_sglang_health_is_503_until_warm_then_each_probe_runs_a_generation_of_a_second() -> None:
    async with engine(*sglang("--ready-after", "3")) as e:
        first = await e.first_answer()
        assert first.status_code == 503 and first.content == b""  # listening, still Starting

        async def probe() -> float | None:
            began = time.monotonic()
            answer = await e.get("/health")
            return time.monotonic() - began if answer.status_code == 200 else None

        took = await eventually(probe)
        assert took >= 1.0  # a lower bound only: the generation is polled with sleep(1)
        assert (await e.stats())["health_generations"] >= 1


async def test_sglang_health_answers_at_once_with_generation_disabled() -> None:
    async with engine(*sglang(), env=SGLANG_FAST_HEALTH) as e:
        health = await e.first_answer()
        assert health.status_code == 200
        assert (await e.stats())["health_generations"] == 0
        assert (await e.get("/health_generate")).status_code == 200  # that one always generates
        assert (await e.stats())["health_generations"] == 1


async def test_sglang_refuses_connections_while_loading_then_503_during_warmup() -> None:
    async with engine(*sglang("--listen-after", "2", "--ready-after", "5"), env=SGLANG_FAST_HEALTH) as e:
        await refused_while_loading(e)
        assert (await e.first_answer()).status_code == 503
        assert (await e.get("/v1/models")).status_code == 200  # answers during warmup
        await eventually(lambda: _status_is(e, "/health", 200))


async def _status_is(e: Engine, path: str, status: int) -> bool:
    return (await e.get(path)).status_code == status


async def test_sglang_release_without_memory_saver_frees_nothing_and_answers_null() -> None:
    async with engine(*sglang(), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        released = await e.post("/release_memory_occupation", {})
        assert released.status_code == 200 and released.json() is None
        assert await e.output() == REAL  # nothing was released: the no-op memory saver
        resumed = await e.client.request("GET", "/resume_memory_occupation", json={"tags": None})  # GET works too
        assert resumed.status_code == 200 and resumed.json() is None
        assert await e.sleep_log() == ["release_memory_occupation", "resume_memory_occupation"]


async def test_sglang_release_without_cpu_backup_loses_the_weights_until_update_weights_from_disk() -> None:
    async with engine(*sglang("--enable-memory-saver"), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        assert await e.output() == REAL
        await e.post("/release_memory_occupation", {})
        assert (await e.stats())["released"] == ["cuda_graph", "kv_cache", "weights"]
        assert (await e.chat()).status_code == 503  # unverified upstream: the fake refuses while released
        await e.post("/resume_memory_occupation", {})
        assert await e.output() == GARBAGE  # resumed: 200, and garbage
        updated = await e.post("/update_weights_from_disk", {"model_path": "/models/weights"})
        assert updated.status_code == 200
        assert updated.json() == {"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": 0}
        assert await e.output() == REAL
        assert await e.sleep_log() == ["release_memory_occupation", "resume_memory_occupation",
                                       "update_weights_from_disk model_path=/models/weights"]


async def test_sglang_weights_survive_a_release_with_cpu_backup() -> None:
    async with engine(*sglang("--enable-memory-saver", "--enable-weights-cpu-backup"), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        await e.post("/release_memory_occupation", {"tags": None})
        await e.post("/resume_memory_occupation", {"tags": None})
        assert await e.output() == REAL


async def test_sglang_level_one_release_of_kv_cache_keeps_the_weights() -> None:
    async with engine(*sglang("--enable-memory-saver"), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        tags = {"tags": ["kv_cache", "cuda_graph"]}
        await e.post("/release_memory_occupation", tags)
        await e.post("/resume_memory_occupation", tags)
        assert await e.output() == REAL
        assert await e.sleep_log() == ["release_memory_occupation tags=kv_cache,cuda_graph",
                                       "resume_memory_occupation tags=kv_cache,cuda_graph"]


async def test_sglang_release_with_a_request_running_kills_the_server() -> None:
    async with engine(*sglang("--enable-memory-saver", "--token-delay", "0.05"), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        s = stream(e, 200)
        await asyncio.wait_for(s.started.wait(), 20)
        with pytest.raises(httpx.TransportError):  # no answer: the scheduler's assert takes the server down
            await e.post("/release_memory_occupation", {})
        assert await asyncio.wait_for(e.proc.wait(), 20) == -signal.SIGKILL
        stderr = await e.stderr()
        assert "Scheduler hit an exception" in stderr
        assert "release_memory_occupation should be called only when no ongoing request" in stderr
        lines, _ = await s.result()
        assert "data: [DONE]" not in lines


async def test_sglang_resume_of_a_tag_not_released_kills_the_server() -> None:
    async with engine(*sglang("--enable-memory-saver"), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        await e.post("/release_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})
        with pytest.raises(httpx.TransportError):
            await e.post("/resume_memory_occupation", {})  # {} = all three tags, weights among them
        assert await asyncio.wait_for(e.proc.wait(), 20) == -signal.SIGKILL
        assert "KeyError: 'weights'" in await e.stderr()


async def test_sglang_memory_routes_need_a_json_body() -> None:
    async with engine(*sglang("--enable-memory-saver"), env=SGLANG_FAST_HEALTH) as e:
        await e.first_answer()
        refused = await e.post("/release_memory_occupation")
        assert refused.status_code == 400 and refused.json()["code"] == 400
        missing = await e.post("/update_weights_from_disk", {})
        assert missing.status_code == 400
        assert await e.sleep_log() == []


# llama.cpp and TensorRT-LLM


async def test_llamacpp_health_is_503_loading_model_then_ok_and_models_answer_while_loading() -> None:
    async with engine("--flavor", "llamacpp", "--model", "/models/w.gguf", "--alias", NAME,
                      "--ready-after", "3") as e:
        models = await e.first_answer("/v1/models")
        assert models.status_code == 200 and models.json()["data"][0]["id"] == NAME
        loading = await e.get("/health")
        assert loading.status_code == 503 and loading.json() == LOADING_BODY
        completion = await e.chat()
        assert completion.status_code == 503 and completion.json() == LOADING_BODY
        ready = await eventually(lambda: _health_ok(e))
        assert ready.json() == {"status": "ok"}
        assert await e.output() == REAL


async def _health_ok(e: Engine) -> httpx.Response | None:
    answer = await e.get("/health")
    return answer if answer.status_code == 200 else None


async def test_trtllm_refuses_connections_while_loading_then_health_is_200() -> None:
    async with engine("--flavor", "trtllm", "org/weights", "--served_model_name", NAME,
                      "--kv_cache_free_gpu_memory_fraction", "0.5", "--ready-after", "2") as e:
        await refused_while_loading(e)
        health = await e.first_answer()
        assert health.status_code == 200
        assert await e.output() == REAL
