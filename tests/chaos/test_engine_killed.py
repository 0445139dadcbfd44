"""An engine killed outright while a client reads its stream: the client gets an error (never a
silently clean end), the model goes FAILED, and the next request starts it again and is served."""

import asyncio
import os
import signal
from pathlib import Path

import docker
import openai
import pytest

from tests.chaos.util import alive
from tests.docker.conftest import docker_engine_spec
from tests.harness import Gateway, fake_engine_spec, run_gateway, write_models

TOKENS = 400  # 0.05 s each: the stream would last 20 s, it is killed after the 3rd token


async def read_until_killed(gw: Gateway, model: str, kill) -> tuple[int, BaseException]:
    """Stream through the openai SDK, call `kill()` at the 3rd chunk; return chunks read and the error."""
    sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0, timeout=30)
    stream = await sdk.chat.completions.create(model=model, messages=[], max_tokens=TOKENS, stream=True)
    received = 0
    with pytest.raises(openai.APIError) as raised:
        async for _ in stream:
            received += 1
            if received == 3:
                await kill()
    return received, raised.value


async def served_again(gw: Gateway, model: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0, timeout=60)
    reply = await sdk.chat.completions.create(model=model, messages=[], max_tokens=3)
    assert reply.choices[0].message.content == " t0 t1 t2"
    stream = await sdk.chat.completions.create(model=model, messages=[], max_tokens=3, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == " t0 t1 t2"
    assert gw.starts(model) == 2
    assert gw.waker.controller(model).state == "ready"


async def test_sigkilled_engine_process_mid_stream_errors_the_stream_fails_the_model_and_restarts(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("victim", "--token-delay", "0.05"))
    async with run_gateway(models) as gw:
        pids: list[int] = []

        async def kill() -> None:
            pid = gw.waker.controller("victim").handle.pid
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)

        received, error = await read_until_killed(gw, "victim", kill)
        assert 3 <= received < TOKENS
        assert "broke off" in str(error)  # the in-band SSE error the gateway sends, raised by the SDK
        failed = await gw.waker.events.wait_for(lambda e: e.target == "failed", timeout=10)
        assert failed.model == "victim"
        assert failed.data["exit_code"] == -signal.SIGKILL
        assert "exited unexpectedly with code -9 (SIGKILL)" in failed.reason
        assert not alive(pids[0])
        controller = gw.waker.controller("victim")
        assert controller.in_flight == 0

        await served_again(gw, "victim")
        assert gw.waker.controller("victim").handle.pid != pids[0]


@pytest.mark.docker
async def test_docker_killed_container_mid_stream_errors_the_stream_fails_the_model_and_restarts(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path, docker_engine_spec(model_name, "--token-delay", "0.05"))
    async with run_gateway(models) as gw:
        killed: list[str] = []

        async def kill() -> None:
            container_id = gw.waker.controller(model_name).handle.container_id
            killed.append(container_id)
            proc = await asyncio.create_subprocess_exec("docker", "kill", container_id,
                                                        stdout=asyncio.subprocess.DEVNULL)
            assert await proc.wait() == 0

        received, error = await read_until_killed(gw, model_name, kill)
        assert 3 <= received < TOKENS
        assert "broke off" in str(error)
        failed = await gw.waker.events.wait_for(lambda e: e.target == "failed", timeout=30)
        assert failed.model == model_name
        assert failed.data["exit_code"] == 137
        assert "exited unexpectedly with code 137 (SIGKILL)" in failed.reason
        assert gw.waker.controller(model_name).in_flight == 0

        await served_again(gw, model_name)
        assert gw.waker.controller(model_name).handle.container_id != killed[0]  # not kept: recreated
