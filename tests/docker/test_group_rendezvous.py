"""Where the parts of a group meet on its head (Ray's GCS port, SGLang's --dist-init-addr port), against the real
Docker daemon: every part runs on the host network, so each start picks a port of its own on the head node and
records it in the parts' labels (issue 17). Both "nodes" are the local daemon, as in test_multinode_runtime."""

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Iterator

import docker
import pytest

from tests.docker.test_multinode_runtime import (  # noqa: F401 (multinode_image: the image check, autouse)
    A,
    B,
    ask,
    bound_blocks,
    group_spec,
    multinode_image,
    parts,
    ports,
    until_ready,
)
from waker.engines.registry import engine_for
from waker.runtime.base import free_port
from waker.runtime.docker.container import LABEL_MODEL, LABEL_RENDEZVOUS
from waker.runtime.docker.group import RENDEZVOUS_BLOCK, GroupHandle, ports_free
from waker.runtime.docker.host import DockerNode
from waker.runtime.docker.runtime import DockerRuntime

pytestmark = pytest.mark.docker


@pytest.fixture
def names(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """Two fresh model names; their containers are removed afterwards."""
    prefix = f"i17-rdv-{uuid.uuid4().hex[:6]}"
    chosen = (f"{prefix}-one", f"{prefix}-two")
    yield chosen
    for name in chosen:
        for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL_MODEL}={name}"}):
            container.remove(force=True)


async def looks_free(node: DockerNode, ports: range) -> bool:
    """A node that can't tell which ports are free (as a remote one, where a port only bound can't be seen)."""
    return True


def meeting(client: docker.DockerClient, model: str) -> int:
    """The rendezvous port the model's parts were given, checked against the commands they run."""
    found = parts(client, model)
    port = int(found["head"].labels[LABEL_RENDEZVOUS])
    assert {c.labels[LABEL_RENDEZVOUS] for c in found.values()} == {str(port)}
    head_argv = found["head"].attrs["Config"]["Cmd"]
    worker_argv = found["worker-1"].attrs["Config"]["Cmd"]
    if found["head"].attrs["Config"]["Entrypoint"] == ["ray"]:
        assert head_argv[head_argv.index("--port") + 1] == str(port)
        assert worker_argv[worker_argv.index("--address") + 1].endswith(f":{port}")
    else:
        for argv in (head_argv, worker_argv):
            assert argv[argv.index("--dist-init-addr") + 1].endswith(f":{port}")
    return port


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_two_groups_configured_on_one_port_with_heads_on_one_node_both_start_and_serve(
        docker_client: docker.DockerClient, names: tuple[str, str], engine: str) -> None:
    same = ports()  # one Ray port and one SGLang rendezvous port, configured for both models
    specs = [group_spec(name, engine, ray_port=same["ray_port"], dist_port=same["dist_port"]) for name in names]
    runtime = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{names[0]}")
    try:
        # Both at once: the second start must not pick the port the first one is about to open.
        handles = await asyncio.gather(*(runtime.start(spec, engine_for(engine)) for spec in specs))
        for handle, name in zip(handles, names, strict=True):
            assert isinstance(handle, GroupHandle)
            await until_ready(handle)
            assert await ask(handle, name) == " t0 t1"
        base = same["ray_port"] if engine == "vllm" else same["dist_port"]
        chosen = {meeting(docker_client, name) for name in names}
        assert len(chosen) == 2
        assert all(port >= base and (port - base) % RENDEZVOUS_BLOCK == 0 for port in chosen)
        for handle in handles:
            await handle.stop(5)
    finally:
        runtime.close()
    assert all(parts(docker_client, name) == {} for name in names)


async def test_a_port_in_use_on_this_machine_is_passed_over(
        docker_client: docker.DockerClient, model_name: str) -> None:
    runtime = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}")
    try:
        with socket.socket() as taken:  # something of this machine's listens on the configured port
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            base = taken.getsockname()[1]
            handle = await runtime.start(group_spec(model_name, "sglang", dist_port=base), engine_for("sglang"))
            await until_ready(handle)
            assert await ask(handle, model_name) == " t0 t1"
        port = meeting(docker_client, model_name)
        assert port > base and (port - base) % RENDEZVOUS_BLOCK == 0
        await handle.stop(5)
    finally:
        runtime.close()


async def test_a_head_that_finds_its_port_taken_is_started_again_on_the_next_block(
        docker_client: docker.DockerClient, model_name: str) -> None:
    runtime = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{model_name}", rendezvous_free=looks_free)
    try:
        with contextlib.ExitStack() as stack:
            base = bound_blocks(stack, 1)  # bound, not listening: invisible to a connection, fatal to the Ray head
            handle = await runtime.start(group_spec(model_name, "vllm", ray_port=base), engine_for("vllm"))
            await until_ready(handle)
        assert meeting(docker_client, model_name) == base + RENDEZVOUS_BLOCK
        assert await ask(handle, model_name) == " t0 t1"
        await handle.stop(5)
    finally:
        runtime.close()
    assert parts(docker_client, model_name) == {}


async def test_a_gateway_sharing_the_daemon_leaves_the_port_of_another_gateways_head_alone(
        docker_client: docker.DockerClient, names: tuple[str, str]) -> None:
    """The port pick reads the labels of every gateway's heads on the daemon: the second gateway, which can't
    test ports (looks_free), starts its head once, on another port."""
    same = ports()
    first, second = (group_spec(name, "vllm", ray_port=same["ray_port"]) for name in names)
    one = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{names[0]}")
    other = DockerRuntime({"node-a": A, "node-b": B}, instance=f"test-{names[1]}", rendezvous_free=looks_free)
    since = time.time() - 1
    try:
        handles = [await one.start(first, engine_for("vllm")), await other.start(second, engine_for("vllm"))]
        for handle, name in zip(handles, names, strict=True):
            await until_ready(handle)
            assert await ask(handle, name) == " t0 t1"
        assert meeting(docker_client, names[0]) == same["ray_port"]
        assert meeting(docker_client, names[1]) == same["ray_port"] + RENDEZVOUS_BLOCK
        created = docker_client.events(since=int(since), until=int(time.time()) + 1, decode=True, filters={
            "type": "container", "event": "create", "label": f"{LABEL_MODEL}={names[1]}"})
        assert sum(1 for _ in created) == 2  # its head and its worker, each once: no start on a taken port
        for handle in handles:
            await handle.stop(5)
    finally:
        one.close()
        other.close()


async def test_a_remote_node_counts_a_port_as_taken_when_something_accepts_connections_there() -> None:
    far = DockerNode(name="far", url="ssh://me@far", address="127.0.0.1")
    assert not far.is_local()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert not await ports_free(far, range(port, port + RENDEZVOUS_BLOCK))
    nobody = free_port()
    assert await ports_free(far, range(nobody, nobody + 1))
