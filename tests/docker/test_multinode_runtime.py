"""Models spanning two nodes, against the real Docker daemon: both "nodes" are the local daemon (two names,
one host), the engines are the fake ray / vllm / sglang of tests/docker/multinode (build_image.sh)."""

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from tests.docker.conftest import TESTS
from tests.harness import run_gateway, write_models
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime.base import free_port
from waker.runtime.docker.container import LABEL_MODEL, LABEL_NODE, LABEL_PART
from waker.runtime.docker.group import RENDEZVOUS_ATTEMPTS, RENDEZVOUS_BLOCK, GroupHandle
from waker.runtime.docker.host import DockerNode
from waker.runtime.docker.runtime import DockerRuntime

pytestmark = pytest.mark.docker

IMAGE = os.environ.get("SPARKGATE_TEST_MULTINODE_IMAGE", "sparkgate-test-multinode:1")
A = DockerNode(name="node-a", address="127.0.0.1")
B = DockerNode(name="node-b", address="127.0.0.1")


@pytest.fixture(scope="module", autouse=True)
def multinode_image(docker_client: docker.DockerClient) -> None:
    try:
        docker_client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"test image {IMAGE} is missing: run tests/docker/build_image.sh")


@pytest.fixture
async def runtime(model_name: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}")
    yield rt
    rt.close()


def ports() -> dict[str, int]:
    """Free ports for the engine (and, SGLang, rank 1's dummy /health on the next one), Ray and the rendezvous:
    the kernel hands out neighbours, and port + 1 must be none of the others."""
    ray, dist = free_port(), free_port()
    while True:
        port = free_port()
        if not {port, port + 1} & {ray, dist}:
            with socket.socket() as probe:
                try:
                    probe.bind(("0.0.0.0", port + 1))
                except OSError:
                    continue
            return {"port": port, "ray_port": ray, "dist_port": dist}


def group_spec(name: str, engine: str, **multinode: Any) -> ModelSpec:
    chosen = ports()
    spec = ModelSpec.model_validate({
        "name": name, "engine": engine, "runtime": "docker", "image": IMAGE, "model": "org/fake-70b",
        "nodes": 2, "network": "host", "port": chosen["port"], "volumes": [f"{TESTS}:/opt/tests:ro"],
        "multinode": {"ray_port": chosen["ray_port"], "dist_port": chosen["dist_port"], "join_timeout": 30,
                      **multinode},
    })
    return spec.model_copy(update={"placed_on": ("node-a", "node-b")})


def parts(client: docker.DockerClient, model: str) -> dict[str, Any]:
    found = client.containers.list(all=True, filters={"label": f"{LABEL_MODEL}={model}"})
    return {c.labels[LABEL_PART]: c for c in found}


def started_at(container: Any) -> datetime:
    return _when(container.attrs["State"]["StartedAt"])


def _when(stamp: str) -> datetime:
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{seconds}.{fraction[:6]:0<6}+00:00")


def logged_at(container: Any, text: str) -> datetime:
    for line in container.logs(timestamps=True).decode().splitlines():
        stamp, _, rest = line.partition(" ")
        if text in rest:
            return _when(stamp)
    raise AssertionError(f"{text!r} not in the logs of {container.name}")


async def until_ready(handle: GroupHandle, timeout: float = 30) -> None:
    exited = asyncio.ensure_future(handle.wait_exit())
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if exited.done():
                tail = "\n".join(await handle.log_tail(30))
                raise AssertionError(f"ended while starting: {exited.result().describe()}\n{tail}")
            try:
                if (await client.get(handle.root_url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("not ready in time; " + "\n".join(await handle.log_tail(30)))


async def ask(handle: GroupHandle, model: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        reply = await client.post(handle.api_base + "/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


async def test_vllm_ray_group_starts_head_then_worker_then_serves_and_stop_removes_every_part(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime) -> None:
    spec = group_spec(model_name, "vllm")
    handle = await runtime.start(spec, engine_for("vllm"))
    assert isinstance(handle, GroupHandle)
    await until_ready(handle)
    assert await ask(handle, model_name) == " t0 t1"

    found = parts(docker_client, model_name)
    assert set(found) == {"head", "worker-1"}
    head, worker = found["head"], found["worker-1"]
    assert head.name != worker.name
    assert head.attrs["HostConfig"]["NetworkMode"] == "host"
    # In order: the worker's container starts only after the head's Ray is up; vllm serve waits for both.
    assert logged_at(head, "Ray runtime started") <= started_at(worker)
    assert logged_at(head, "node joined: 127.0.0.1 (2 nodes)") <= logged_at(head, "placement group ready on 2 nodes")
    assert "VLLM_HOST_IP=127.0.0.1" in worker.attrs["Config"]["Env"]
    tail = await handle.log_tail(50)
    assert any(line.startswith("[head@node-a] ") and "placement group ready" in line for line in tail)
    assert any(line.startswith("[worker-1@node-b] ") for line in tail)
    assert "head@node-a" in handle.ident and "worker-1@node-b" in handle.ident

    await handle.stop(5)
    assert parts(docker_client, model_name) == {}


async def test_killing_the_ray_worker_ends_the_group_and_names_the_worker(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime) -> None:
    handle = await runtime.start(group_spec(model_name, "vllm"), engine_for("vllm"))
    await until_ready(handle)
    parts(docker_client, model_name)["worker-1"].kill()
    end = await asyncio.wait_for(handle.wait_exit(), timeout=20)
    assert end.part == "worker-1 on node 'node-b'"
    assert end.describe() == "code 137 (SIGKILL) in worker-1 on node 'node-b'"
    assert handle.exit_code == 137
    await handle.stop(5)
    assert parts(docker_client, model_name) == {}


async def test_a_worker_that_cannot_join_fails_the_start_naming_it_and_leaves_no_container(
        docker_client: docker.DockerClient, model_name: str) -> None:
    # The head's cluster address leads nowhere (TEST-NET-1): the worker can't reach the Ray head.
    lost = DockerNode(name="node-a", address="127.0.0.1", cluster_address="192.0.2.1")
    runtime = DockerRuntime({"node-a": lost, "node-b": B}, instance=f"test-{model_name}")
    spec = group_spec(model_name, "vllm", worker_env={"SPARKGATE_FAKE_CONNECT_TIMEOUT": "1"})
    try:
        with pytest.raises(RuntimeError) as failed:
            await runtime.start(spec, engine_for("vllm"))
    finally:
        runtime.close()
    message = str(failed.value)
    assert "worker-1 on node 'node-b' exited with code 1 while starting" in message
    assert "Failed to connect to 192.0.2.1" in message
    assert parts(docker_client, model_name) == {}


async def test_a_head_that_cannot_open_its_rendezvous_port_fails_the_start(
        docker_client: docker.DockerClient, model_name: str) -> None:
    # The node can't tell which ports are free (as a remote one, where a port only bound can't be seen), and every
    # block the start tries is bound, not listening: SGLang rank 0 can't bind it, each time.
    async def looks_free(node: DockerNode, ports: range) -> bool:
        return True

    runtime = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}", rendezvous_free=looks_free)
    with contextlib.ExitStack() as stack:
        base = bound_blocks(stack, RENDEZVOUS_ATTEMPTS)
        spec = group_spec(model_name, "sglang", dist_port=base)
        try:
            with pytest.raises(RuntimeError, match="head on node 'node-a' exited with code 1 while starting") as e:
                await runtime.start(spec, engine_for("sglang"))
        finally:
            runtime.close()
    assert "address already in use" in str(e.value)
    assert parts(docker_client, model_name) == {}


def bound_blocks(stack: contextlib.ExitStack, count: int) -> int:
    """The first port of `count` rendezvous blocks whose first ports are bound (not listening) until `stack` ends."""
    while True:
        first = free_port()
        sockets = []
        try:
            for index in range(count):
                sock = stack.enter_context(socket.socket())
                sockets.append(sock)
                sock.bind(("0.0.0.0", first + index * RENDEZVOUS_BLOCK))
        except OSError:
            for sock in sockets:
                sock.close()
            continue
        return first


async def test_a_part_that_is_never_up_fails_at_join_timeout(
        docker_client: docker.DockerClient, model_name: str) -> None:
    # Rank 0 runs, but its rendezvous port can't be reached at node-a's address (TEST-NET-1): never "up".
    unreachable = DockerNode(name="node-a", address="192.0.2.1", cluster_address="127.0.0.1")
    runtime = DockerRuntime({"node-a": unreachable, "node-b": B}, instance=f"test-{model_name}")
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="head on node 'node-a' was not up within its join_timeout of 2s"):
            await runtime.start(group_spec(model_name, "sglang", join_timeout=2), engine_for("sglang"))
    finally:
        runtime.close()
    assert time.monotonic() - began < 15
    assert parts(docker_client, model_name) == {}


async def test_a_start_cancelled_while_a_worker_joins_leaves_no_container(
        docker_client: docker.DockerClient, model_name: str) -> None:
    lost = DockerNode(name="node-a", address="127.0.0.1", cluster_address="192.0.2.1")
    runtime = DockerRuntime({"node-a": lost, "node-b": B}, instance=f"test-{model_name}")
    spec = group_spec(model_name, "vllm", worker_env={"SPARKGATE_FAKE_CONNECT_TIMEOUT": "60"})
    try:
        starting = asyncio.ensure_future(runtime.start(spec, engine_for("vllm")))
        deadline = time.monotonic() + 20
        while "worker-1" not in parts(docker_client, model_name):  # the head is up, the worker trying to join
            assert time.monotonic() < deadline and not starting.done()
            await asyncio.sleep(0.1)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
    finally:
        runtime.close()
    assert parts(docker_client, model_name) == {}


async def test_a_missing_image_is_a_clear_error(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime) -> None:
    spec = group_spec(model_name, "vllm").model_copy(update={"image": "sparkgate-no-such-image:0"})
    with pytest.raises(RuntimeError, match="head on node 'node-a': image 'sparkgate-no-such-image:0' is not on"):
        await runtime.start(spec, engine_for("vllm"))
    assert parts(docker_client, model_name) == {}


async def test_unplaced_group_is_refused() -> None:
    spec = group_spec("unplaced", "vllm").model_copy(update={"placed_on": ("node-a",)})
    rt = DockerRuntime({"node-a": A, "node-b": B})
    try:
        with pytest.raises(RuntimeError, match="spans 2 nodes but was placed on 1"):
            await rt.start(spec, engine_for("vllm"))
    finally:
        rt.close()


async def test_sglang_ranks_meet_rank_0_serves_and_a_lost_worker_ends_the_group(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime) -> None:
    spec = group_spec(model_name, "sglang")
    handle = await runtime.start(spec, engine_for("sglang"))
    assert isinstance(handle, GroupHandle)
    await until_ready(handle)
    assert await ask(handle, model_name) == " t0 t1"
    found = parts(docker_client, model_name)
    assert logged_at(found["head"], "Init torch distributed begin") <= started_at(found["worker-1"])
    assert logged_at(found["head"], "rank 1 joined") <= logged_at(found["head"], "All ranks joined")
    async with httpx.AsyncClient() as client:  # rank 1's dummy health, beside rank 0's port
        assert (await client.get(f"http://127.0.0.1:{spec.port + 1}/health")).status_code == 200

    found["worker-1"].kill()
    end = await asyncio.wait_for(handle.wait_exit(), timeout=20)
    assert end.part == "worker-1 on node 'node-b'"
    await asyncio.sleep(1)
    head = docker_client.containers.get(found["head"].id)
    assert head.attrs["State"]["ExitCode"] == 1  # rank 0 lost its peer, as NCCL would make it
    await handle.stop(5)
    assert parts(docker_client, model_name) == {}


async def test_a_restarted_gateway_finds_a_complete_group_as_one_engine_with_its_nodes(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime) -> None:
    spec = group_spec(model_name, "vllm")
    handle = await runtime.start(spec, engine_for("vllm"))
    await until_ready(handle)

    later = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}")
    try:
        [found] = [f for f in await later.discover() if f.model == model_name]
        assert found.running and found.nodes == ("node-a", "node-b")
        assert found.spec_hash == spec.spec_hash()
        assert isinstance(found.handle, GroupHandle) and found.handle.serve is not None
        assert found.handle.root_url == handle.root_url
        await later.discard(found, "test")
    finally:
        later.close()
    assert parts(docker_client, model_name) == {}


def models_d_entry(name: str, engine: str) -> dict[str, Any]:
    chosen = ports()
    return {"name": name, "engine": engine, "runtime": "docker", "image": IMAGE, "model": "org/fake-70b",
            "nodes": 2, "network": "host", "port": chosen["port"], "volumes": [f"{TESTS}:/opt/tests:ro"],
            "memory_gb": 10,
            "multinode": {"ray_port": chosen["ray_port"], "dist_port": chosen["dist_port"], "join_timeout": "30s"},
            "start_timeout": "60s", "stop_timeout": "5s", "min_uptime": 0}


def held(gw: Any) -> dict[str, float]:
    return {name: admission.held_gb() for name, admission in gw.waker.admissions.items()}


GATEWAY_NODES = {"a": {"total_gb": 20, "reserve_gb": 0, "memory_probe": "none"},
                 "b": {"total_gb": 20, "reserve_gb": 0, "memory_probe": "none"}}


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_through_the_gateway_a_two_node_model_serves_fails_by_part_restarts_and_is_adopted(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str, engine: str) -> None:
    models = write_models(tmp_path, models_d_entry(model_name, engine))
    body = {"model": model_name, "messages": [], "max_tokens": 2}
    async with run_gateway(models, nodes=GATEWAY_NODES) as gw, httpx.AsyncClient(timeout=60) as client:
        reply = await client.post(gw.v1 + "/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        found = parts(docker_client, model_name)
        assert {role: c.labels[LABEL_NODE] for role, c in found.items()} == {"head": "a", "worker-1": "b"}
        assert held(gw) == {"a": 10, "b": 10}  # memory_gb on each node it spans

        found["worker-1"].kill()
        failed = await gw.waker.events.wait_for(lambda e: e.target == "failed", timeout=30)
        assert "exited unexpectedly with code 137 (SIGKILL) in worker-1 on node 'b'" in failed.reason
        await gw.waker.events.wait_for(lambda e: e.kind == "removed" and e.model == model_name, timeout=30)
        assert parts(docker_client, model_name) == {}  # the head went down with its worker
        assert held(gw) == {"a": 0, "b": 0}
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        assert gw.starts(model_name) == 2
    before = parts(docker_client, model_name)
    assert {c.status for c in before.values()} == {"running"}  # the gateway's exit leaves them running

    async with run_gateway(models, nodes=GATEWAY_NODES) as gw, httpx.AsyncClient(timeout=60) as client:
        await gw.waker.events.wait_for(lambda e: e.target == "ready", timeout=30)
        assert any("adopting running engine" in e.reason for e in gw.waker.events.recent(model_name))
        assert held(gw) == {"a": 10, "b": 10}
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        after = parts(docker_client, model_name)
        assert {r: c.id for r, c in after.items()} == {r: c.id for r, c in before.items()}
        assert {r: c.attrs["State"]["StartedAt"] for r, c in after.items()} == {
            r: c.attrs["State"]["StartedAt"] for r, c in before.items()}
        await gw.waker.stop(model_name)
        assert held(gw) == {"a": 0, "b": 0}
    assert parts(docker_client, model_name) == {}
