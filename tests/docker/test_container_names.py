"""Container names against the real Docker daemon (issue 17): models whose names read alike once made valid Docker
names, and gateways (instances) sharing one daemon, each get containers of their own; each gateway finds only its
own at boot."""

import re
import uuid
from collections.abc import Iterator

import docker
import pytest

from tests.docker.conftest import docker_engine_spec
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime.docker.container import LABEL_INSTANCE, LABEL_MODEL, DockerHandle
from waker.runtime.docker.runtime import DockerRuntime

pytestmark = pytest.mark.docker

VALID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


@pytest.fixture
def prefix(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh prefix for model names; every container of a model named with it is removed afterwards."""
    chosen = f"i17-names-{uuid.uuid4().hex[:6]}"
    yield chosen
    for container in docker_client.containers.list(all=True, filters={"label": LABEL_MODEL}):
        if container.labels[LABEL_MODEL].startswith(chosen):
            container.remove(force=True)


def spec(name: str) -> ModelSpec:
    return ModelSpec.model_validate(docker_engine_spec(name))


async def test_models_whose_names_read_alike_start_side_by_side(
        docker_client: docker.DockerClient, prefix: str) -> None:
    models = [f"{prefix}/Qwen3-4B", f"{prefix}:Qwen3-4B", f"{prefix}-Qwen3-4B"]
    runtime = DockerRuntime(instance=f"test-{prefix}")
    try:
        handles = [await runtime.start(spec(model), engine_for("generic")) for model in models]
        assert all(isinstance(handle, DockerHandle) for handle in handles)
        containers = [docker_client.containers.get(h.container_id) for h in handles if isinstance(h, DockerHandle)]
        assert [c.labels[LABEL_MODEL] for c in containers] == models
        assert all(c.status == "running" for c in containers)
        assert len({c.name for c in containers}) == 3
        assert all(VALID.fullmatch(c.name) and c.name.startswith(f"sparkgate-{prefix}-Qwen3-4B-") for c in containers)
        for handle in handles:
            await handle.stop(5)
    finally:
        runtime.close()


async def test_two_gateways_sharing_a_daemon_each_start_the_same_model_and_find_only_their_own(
        docker_client: docker.DockerClient, prefix: str) -> None:
    model = f"{prefix}-shared"
    one, other = DockerRuntime(instance=f"{prefix}-gw1"), DockerRuntime(instance=f"{prefix}-gw2")
    try:
        first = await one.start(spec(model), engine_for("generic"))
        second = await other.start(spec(model), engine_for("generic"))
        assert isinstance(first, DockerHandle) and isinstance(second, DockerHandle)
        assert first.container_id != second.container_id
        for runtime, handle in ((one, first), (other, second)):
            # A restarted gateway of each instance finds its own container, never the other's.
            later = DockerRuntime(instance=runtime.instance)
            try:
                found = [f for f in await later.discover() if f.model == model]
            finally:
                later.close()
            assert [(f.running, f.handle.ident) for f in found] == [(True, handle.ident)]
            container = docker_client.containers.get(handle.container_id)
            assert container.labels[LABEL_INSTANCE] == runtime.instance
        await first.stop(5)
        await second.stop(5)
    finally:
        one.close()
        other.close()
