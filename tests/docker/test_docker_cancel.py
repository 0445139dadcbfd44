"""A Docker start or stop cancelled while an SDK call runs in its thread leaves no container running that nobody
tracks.

The cancellation is made exact by holding the runtime's SDK call in its thread once Docker has done its work
(container made and started, or stopped) until the test has cancelled the awaiting task: the call is then still
running when the cancellation arrives, as it is when a stop or a shutdown cancels a start while Docker creates the
engine, or a shutdown cancels a stop.
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import docker
import pytest

from tests.docker.conftest import docker_engine_spec
from tests.docker.test_multinode_runtime import B, group_spec, parts, until_ready
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime.docker.container import LABEL_MODEL, DockerHandle
from waker.runtime.docker.group import GroupHandle
from waker.runtime.docker.host import DockerHost, DockerNode
from waker.runtime.docker.runtime import DockerRuntime

pytestmark = pytest.mark.docker


def containers_of(client: docker.DockerClient, model: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{LABEL_MODEL}={model}"})


class HeldCall:
    """Wraps a Docker host's `call`: the first SDK call does its work in its thread, says so (`done`), and
    returns only once `release` is set. Later calls (the clean-up) pass straight through."""

    def __init__(self, host: DockerHost, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done = threading.Event()
        self.release = threading.Event()
        original = host.call
        held = False

        async def call(fn: Callable[[docker.DockerClient], Any], **kwargs: Any) -> Any:
            nonlocal held
            if held:
                return await original(fn, **kwargs)
            held = True

            def work_then_hold(client: docker.DockerClient) -> Any:
                try:
                    return fn(client)
                finally:
                    self.done.set()
                    self.release.wait(timeout=60)

            return await original(work_then_hold, **kwargs)

        monkeypatch.setattr(host, "call", call)

    async def until_done(self) -> None:
        assert await asyncio.to_thread(self.done.wait, 60), "the SDK call never ran"


@pytest.fixture
async def runtime(model_name: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(instance=f"test-{model_name}")
    yield rt
    rt.close()


def spec_of(name: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate(docker_engine_spec(name, **fields))


async def cancel_while_held(runtime: DockerRuntime, spec: ModelSpec, held: HeldCall) -> None:
    starting = asyncio.ensure_future(runtime.start(spec, engine_for(spec.engine)))
    await held.until_done()  # Docker has made and started the container; the call has not returned yet
    starting.cancel()
    held.release.set()
    with pytest.raises(asyncio.CancelledError):
        await starting


async def test_a_start_cancelled_while_docker_creates_the_container_leaves_no_container(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime,
        monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldCall(runtime.node("local"), monkeypatch)
    await cancel_while_held(runtime, spec_of(model_name), held)
    # Gone as soon as the cancellation has propagated: no container runs, none is left behind.
    assert containers_of(docker_client, model_name) == []


async def test_a_cancelled_start_of_a_kept_container_stops_it_and_keeps_it_for_the_next_start(
        docker_client: docker.DockerClient, model_name: str, runtime: DockerRuntime,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_of(model_name, keep_container=True)
    first = await runtime.start(spec, engine_for(spec.engine))
    await first.stop(0)
    [kept] = containers_of(docker_client, model_name)
    assert kept.status == "exited"

    held = HeldCall(runtime.node("local"), monkeypatch)
    await cancel_while_held(runtime, spec, held)  # the call restarted the kept container
    [after] = containers_of(docker_client, model_name)
    assert (after.id, after.status) == (kept.id, "exited")  # stopped again, still kept

    again = await runtime.start(spec, engine_for(spec.engine))
    assert isinstance(again, DockerHandle) and again.container_id == kept.id
    await again.stop(0)


async def test_a_group_stop_cancelled_while_a_worker_stops_still_removes_every_part(
        docker_client: docker.DockerClient, model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model spanning two nodes: the workers are stopped first, the head last; a stop cancelled while a worker
    stops must not leave the head running."""
    runtime = DockerRuntime({"node-a": DockerNode(name="node-a"), "node-b": B}, instance=f"test-{model_name}")
    try:
        handle = await runtime.start(group_spec(model_name, "sglang"), engine_for("sglang"))
        assert isinstance(handle, GroupHandle)
        await until_ready(handle)
        held = HeldCall(runtime.node("node-b"), monkeypatch)  # the worker's node
        stopping = asyncio.ensure_future(handle.stop(30))
        await held.until_done()  # the worker is stopped and removed; its call has not returned yet
        stopping.cancel()
        held.release.set()
        with pytest.raises(asyncio.CancelledError):
            await stopping
    finally:
        runtime.close()
    assert parts(docker_client, model_name) == {}
