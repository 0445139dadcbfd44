"""The docker runtime against the real Docker daemon: containers made from models.d entries."""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import docker.errors
import httpx
import openai
import pytest

from tests.docker.conftest import docker_engine_spec
from tests.harness import fake_engine_spec, run_gateway, write_models
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime.docker.container import LABEL_HASH, LABEL_MANAGED, LABEL_MODEL, DockerHandle, container_name
from waker.runtime.docker.runtime import DockerRuntime

pytestmark = pytest.mark.docker


def containers_of(client: docker.DockerClient, model: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_MODEL}={model}"})


def start_events(client: docker.DockerClient, model: str, since: float) -> int:
    events = client.events(since=int(since), until=int(time.time()) + 1, decode=True,
                           filters={"type": "container", "event": "start", "label": f"{LABEL_MODEL}={model}"})
    return sum(1 for _ in events)


async def test_cold_request_creates_a_container_streams_and_idle_stops_it(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    ulimits = {"stack": 67108864, "nofile": {"soft": 1024, "hard": 2048}}
    spec = docker_engine_spec(model_name, idle_timeout="1s", shm_size="64m", ulimits=ulimits, ipc="private",
                              env={"ENGINE_FLAVOUR": "fake"})
    models = write_models(tmp_path, spec)
    async with run_gateway(models, reap_interval=0.1) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        stream = await sdk.chat.completions.create(model=model_name, messages=[], max_tokens=4, stream=True)
        assert "".join([c.choices[0].delta.content async for c in stream]) == " t0 t1 t2 t3"

        [container] = containers_of(docker_client, model_name)
        assert container.name == container_name(model_name, f"test-{os.getpid()}")  # run_gateway's instance
        assert container.status == "running"
        assert container.labels[LABEL_MANAGED] == "true"
        assert container.labels[LABEL_HASH] == gw.waker.registry[model_name].spec_hash()
        host = container.attrs["HostConfig"]
        assert host["RestartPolicy"]["Name"] == "no"
        assert host["ShmSize"] == 64 * 1024 * 1024
        assert {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]} == {
            "stack": (67108864, 67108864), "nofile": (1024, 2048)}
        assert "ENGINE_FLAVOUR=fake" in container.attrs["Config"]["Env"]
        assert any(b["HostIp"] == "127.0.0.1" for b in host["PortBindings"]["8000/tcp"])

        await gw.waker.events.wait_for(lambda e: e.kind == "idle_stop", timeout=30)
        await gw.waker.events.wait_for(lambda e: e.target == "stopped", timeout=30)
        assert containers_of(docker_client, model_name) == []  # stopped and removed


async def test_fifty_concurrent_cold_requests_start_one_container(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    since = time.time() - 1
    models = write_models(tmp_path, docker_engine_spec(model_name))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        body = {"model": model_name, "messages": [], "max_tokens": 2}
        answers = await asyncio.gather(*(client.post(gw.v1 + "/chat/completions", json=body) for _ in range(50)))
        assert [a.status_code for a in answers] == [200] * 50
        assert gw.starts(model_name) == 1
        assert len(containers_of(docker_client, model_name)) == 1
        assert start_events(docker_client, model_name, since) == 1


async def test_gateway_restart_adopts_the_running_container_without_restarting_it(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path, docker_engine_spec(model_name))
    body = {"model": model_name, "messages": [], "max_tokens": 2}
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
    [before] = containers_of(docker_client, model_name)
    assert before.status == "running"  # the gateway's exit leaves containers running

    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        adopted = await gw.waker.events.wait_for(lambda e: e.target == "ready", timeout=30)
        assert adopted.data["engine"] == f"container {before.short_id}"
        assert any("adopting running engine" in e.reason for e in gw.waker.events.recent(model_name))
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
    [after] = containers_of(docker_client, model_name)
    assert after.id == before.id
    assert after.attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
    assert after.attrs["RestartCount"] == 0


async def test_a_kept_container_claimed_after_a_restart_is_kept_at_its_stop_and_reused(
        docker_client: docker.DockerClient, model_name: str) -> None:
    """`keep_container` survives a gateway restart: the new runtime's handle for the running container comes from
    claim(found, spec), which knows the spec; the one discover() made can only guess (running: not kept)."""
    spec = ModelSpec.model_validate(docker_engine_spec(model_name, keep_container=True))
    before, after = DockerRuntime(instance=f"test-{model_name}"), DockerRuntime(instance=f"test-{model_name}")
    try:
        started = await before.start(spec, engine_for(spec.engine))
        assert isinstance(started, DockerHandle)

        [found] = await after.discover()  # the gateway restarted
        assert (found.model, found.running, found.spec_hash) == (model_name, True, spec.spec_hash())
        adopted = after.claim(found, spec)
        assert isinstance(adopted, DockerHandle) and adopted.container_id == started.container_id
        await adopted.stop(5)
        [kept] = containers_of(docker_client, model_name)
        assert (kept.id, kept.status) == (started.container_id, "exited")  # stopped, not removed

        again = await after.start(spec, engine_for(spec.engine))
        assert isinstance(again, DockerHandle) and again.container_id == started.container_id
        await again.stop(0)
    finally:
        before.close()
        after.close()


async def test_claim_refuses_another_models_engine(docker_client: docker.DockerClient, model_name: str) -> None:
    spec = ModelSpec.model_validate(docker_engine_spec(model_name))
    runtime = DockerRuntime(instance=f"test-{model_name}")
    try:
        await runtime.start(spec, engine_for(spec.engine))
        [found] = await runtime.discover()
        with pytest.raises(ValueError, match="not 'other'"):
            runtime.claim(found, spec.model_copy(update={"name": "other"}))
    finally:
        runtime.close()


async def test_container_killed_mid_stream_ends_the_stream_with_an_error_and_restarts_later(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path, docker_engine_spec(model_name, "--token-delay", "0.05"))
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        stream = await sdk.chat.completions.create(model=model_name, messages=[], max_tokens=500, stream=True)
        received = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                received += 1
                if received == 2:
                    containers_of(docker_client, model_name)[0].kill()
        assert received < 500
        failed = await gw.waker.events.wait_for(lambda e: e.target == "failed", timeout=30)
        assert failed.data["exit_code"] == 137
        assert "exited unexpectedly with code 137" in failed.reason

        reply = await sdk.chat.completions.create(model=model_name, messages=[], max_tokens=2)
        assert reply.choices[0].message.content == " t0 t1"
        assert gw.starts(model_name) == 2


async def test_container_that_exits_at_start_gives_503_with_exit_code_and_log_tail(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path, docker_engine_spec(model_name, "--exit-at-start", "3", start_timeout="5m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        began = time.monotonic()
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": model_name, "messages": []})
        assert time.monotonic() - began < 20  # at the exit, not at the 5 minute start_timeout
        assert resp.status_code == 503
        message = resp.json()["error"]["message"]
        assert "exited with code 3 during start" in message
        assert "error: out of memory while loading weights" in message
        state = (await client.get(gw.v1 + f"/models/{model_name}")).json()
        assert state["state"] == "failed"


async def test_oom_killed_container_is_reported_as_such(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path, docker_engine_spec(model_name, "--alloc-mb", "256", mem_limit="48m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": model_name, "messages": []})
        assert resp.status_code == 503
        message = resp.json()["error"]["message"]
        assert "code 137" in message and "killed for lack of memory (OOM)" in message


async def test_changed_spec_recreates_the_container_and_same_spec_reuses_a_kept_one(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    body = {"model": model_name, "messages": [], "max_tokens": 1}
    models = write_models(tmp_path, docker_engine_spec(model_name, keep_container=True))

    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        await gw.waker.stop(model_name)
    [kept] = containers_of(docker_client, model_name)
    assert kept.status == "exited"  # stopped, kept for a faster next start

    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        [reused] = containers_of(docker_client, model_name)
        assert reused.id == kept.id
        await gw.waker.stop(model_name)

    models = write_models(tmp_path, docker_engine_spec(model_name, "--token-delay", "0", keep_container=True))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        stale = await gw.waker.events.wait_for(lambda e: e.kind == "stale_engine", timeout=10)
        assert "spec changed" in stale.reason
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        [fresh] = containers_of(docker_client, model_name)
        assert fresh.id != kept.id
        assert fresh.labels[LABEL_HASH] == gw.waker.registry[model_name].spec_hash()
        await gw.waker.stop(model_name)


async def test_model_removed_from_models_d_has_its_container_stopped_at_boot(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    models = write_models(tmp_path / "a", docker_engine_spec(model_name))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=60) as client:
        await client.post(gw.v1 + "/chat/completions", json={"model": model_name, "messages": []})
    assert containers_of(docker_client, model_name)[0].status == "running"
    others = write_models(tmp_path / "b", fake_engine_spec("other"))
    async with run_gateway(others) as gw:
        stale = await gw.waker.events.wait_for(lambda e: e.model == model_name, timeout=10)
        assert "no longer in models.d" in stale.reason
    assert containers_of(docker_client, model_name) == []


@contextlib.asynccontextmanager
async def socket_forwarder(path: Path, target: str = "/var/run/docker.sock") -> AsyncIterator[asyncio.Server]:
    """A unix socket that forwards to the real daemon's, to make Docker 'unreachable' and back."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield server
    finally:
        server.close()
        path.unlink(missing_ok=True)


async def test_unreachable_docker_fails_clearly_keeps_other_models_serving_and_recovers(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    sock = tmp_path / "docker.sock"
    models = write_models(tmp_path / "m", docker_engine_spec(model_name, node="flaky"), fake_engine_spec("local"))
    nodes = {"local": {}, "flaky": {"docker_host": f"unix://{sock}"}}
    async with run_gateway(models, nodes=nodes) as gw, httpx.AsyncClient(timeout=60) as client:
        body = {"model": model_name, "messages": [], "max_tokens": 1}
        resp = await client.post(gw.v1 + "/chat/completions", json=body)
        assert resp.status_code == 503
        assert f"Docker on node 'flaky' (unix://{sock}) is unreachable" in resp.json()["error"]["message"]
        assert "Retry-After" in resp.headers
        local = await client.post(gw.v1 + "/chat/completions", json={"model": "local", "messages": []})
        assert local.status_code == 200  # the other runtimes keep serving

        async with socket_forwarder(sock):
            # the daemon is back: the next request (after a short backoff) starts the container
            for _ in range(20):
                resp = await client.post(gw.v1 + "/chat/completions", json=body)
                if resp.status_code == 200:
                    break
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
            assert resp.status_code == 200
            assert len(containers_of(docker_client, model_name)) == 1
            await gw.waker.stop(model_name)


async def test_a_port_taken_before_docker_publishes_it_is_picked_again(
        docker_client: docker.DockerClient, model_name: str) -> None:
    # Picking a free port is check-then-use: something may take it before Docker publishes it. The start is made
    # again on another port instead of failing the model.
    import socket

    from waker.runtime.base import free_port

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks: list[int] = []

    def pick(host: str) -> int:
        picks.append(taken if not picks else free_port(host))
        return picks[-1]

    runtime = DockerRuntime(instance="test-ports", pick_port=pick)
    spec = ModelSpec.model_validate(docker_engine_spec(model_name))
    try:
        handle = await runtime.start(spec, engine_for(spec.engine))
        try:
            assert len(picks) == 2 and handle.root_url.endswith(f":{picks[1]}")
            [container] = containers_of(docker_client, model_name)
            assert container.status == "running"
        finally:
            await handle.stop(0)
    finally:
        squatter.close()
        runtime.close()
