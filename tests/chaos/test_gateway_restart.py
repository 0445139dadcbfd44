"""The gateway process gets SIGTERM while streams are in flight: every stream completes, the gateway
exits cleanly and leaves its engine container running, and the next gateway adopts that container
(same id, never restarted) and serves from it. Engine processes (process runtime), by contrast, stop
with the gateway."""

import asyncio
from pathlib import Path

import docker
import openai
import pytest

from tests.chaos.util import GatewayProcess, alive, free_port
from tests.docker.conftest import docker_engine_spec
from tests.docker.test_docker_runtime import containers_of
from tests.harness import fake_engine_spec, write_models

STREAMS = 10
TOKENS = 15  # 0.1 s each: every stream lasts ~1.5 s
EXPECTED = "".join(f" t{i}" for i in range(TOKENS))


@pytest.mark.docker
async def test_sigterm_under_load_completes_every_stream_and_the_next_gateway_adopts_the_container(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path / "models", docker_engine_spec(model_name, "--token-delay", "0.1"))
    env = {"SPARKGATE_NODES": '{"local": {"memory_probe": "none"}}'}
    port = free_port()
    first = GatewayProcess(models, port, env)
    await first.start()
    try:
        sdk = openai.AsyncOpenAI(base_url=first.v1, api_key="x", max_retries=0, timeout=60)
        warm = await sdk.chat.completions.create(model=model_name, messages=[], max_tokens=1)
        assert warm.choices[0].message.content == " t0"
        [before] = containers_of(docker_client, model_name)

        streaming = asyncio.Semaphore(0)

        async def stream() -> str:
            response = await sdk.chat.completions.create(model=model_name, messages=[], max_tokens=TOKENS,
                                                         stream=True)
            text = ""
            async for chunk in response:
                if not text:
                    streaming.release()  # this stream is under way
                text += chunk.choices[0].delta.content or ""
            return text

        tasks = [asyncio.create_task(stream()) for _ in range(STREAMS)]
        async with asyncio.timeout(30):
            for _ in range(STREAMS):
                await streaming.acquire()
        first.terminate()
        texts = await asyncio.gather(*tasks)
        assert texts == [EXPECTED] * STREAMS  # none cut short by the shutdown
        code = await first.wait(timeout=40)
        # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done (0.29+); the CLI
        # clears it, so a drained shutdown exits 0 (it was -15 before commit 0489a64).
        assert code == 0, "\n".join(first.lines[-40:])
        assert any("Application shutdown complete" in line for line in first.lines)
        assert not any("Traceback" in line for line in first.lines), "\n".join(first.lines)
        before.reload()
        assert before.status == "running"  # containers outlive the gateway

        second = GatewayProcess(models, port, env)
        await second.start()
        try:
            adopting = await second.wait_event(
                lambda e: e["model"] == model_name and e["target"] == "starting", timeout=30)
            assert adopting["reason"] == f"adopting running engine container {before.short_id}"
            ready = await second.wait_event(lambda e: e["model"] == model_name and e["target"] == "ready", timeout=30)
            assert ready["data"]["engine"] == f"container {before.short_id}"
            sdk = openai.AsyncOpenAI(base_url=second.v1, api_key="x", max_retries=0, timeout=60)
            response = await sdk.chat.completions.create(model=model_name, messages=[], max_tokens=3, stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in response]) == " t0 t1 t2"
            [after] = containers_of(docker_client, model_name)
            assert after.id == before.id
            assert after.attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
            assert after.attrs["RestartCount"] == 0
            assert sum(1 for e in second.events if e["target"] == "starting") == 1  # the adoption only
            second.terminate()
            assert await second.wait(timeout=40) == 0
        finally:
            await second.kill()
    finally:
        await first.kill()


async def test_sigterm_stops_engine_processes_and_exits_with_status_0(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models", fake_engine_spec("proc", "--token-delay", "0.1"))
    gateway = GatewayProcess(models, free_port(), {"SPARKGATE_NODES": '{"local": {"memory_probe": "none"}}'})
    await gateway.start()
    try:
        sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key="x", max_retries=0, timeout=60)
        stream = await sdk.chat.completions.create(model="proc", messages=[], max_tokens=10, stream=True)
        ready = await gateway.wait_event(lambda e: e["model"] == "proc" and e["target"] == "ready", timeout=30)
        pid = int(ready["data"]["engine"].removeprefix("pid "))
        gateway.terminate()
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "".join(f" t{i}" for i in range(10))  # in flight at SIGTERM: completed
        code = await gateway.wait(timeout=40)
        assert not alive(pid)  # engine processes do not outlive the gateway
        stopped = [e for e in gateway.events if e["model"] == "proc" and e["target"] == "stopped"]
        assert stopped and stopped[-1]["reason"] == "engine stopped"
        assert code == 0, "\n".join(gateway.lines[-40:])
    finally:
        await gateway.kill()
