"""Container memory from the real Docker daemon, in the locally built test image: read by the Docker runtime
(DockerHandle, the ContainerEngine protocol), sampled through it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import pytest

from stats.sampler import Sampler
from stats.store import SampleStore
from tests.docker.conftest import IMAGE
from tests.stats.conftest import MIB, FakeWaker, status
from waker.runtime.base import ContainerEngine
from waker.runtime.docker.container import DockerHandle, container_memory, container_pids
from waker.runtime.docker.host import DockerHost, DockerNode
from waker.runtime.memory import GIB
from waker.state import ModelState

pytestmark = pytest.mark.docker

# Allocates and touches ~100 MiB of anonymous memory, says so, and waits.
HOLD_100_MIB = (
    "import sys, time\n"
    "buf = bytearray(100 * 1024 * 1024)\n"
    "for i in range(0, len(buf), 4096):\n"
    "    buf[i] = 1\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def container(docker_client: docker.DockerClient) -> Iterator[str]:
    """A running container holding ~100 MiB; removed afterwards."""
    created = docker_client.containers.run(IMAGE, ["python3", "-c", HOLD_100_MIB], detach=True,
                                    name=f"sparkgate-stats-{uuid.uuid4().hex[:8]}", labels={"sparkgate.test": "stats"})
    try:
        for line in created.logs(stream=True, follow=True):
            if b"ready" in line:
                break
        yield str(created.id)
    finally:
        created.remove(force=True)


def test_cgroup_memory_of_a_container(docker_client: docker.DockerClient, container: str) -> None:
    used = container_memory(docker_client, container)
    assert used is not None and used >= 90 * MIB
    assert used < 1024 * MIB  # the cgroup of this container alone


def test_container_pids_are_host_pids(docker_client: docker.DockerClient, container: str) -> None:
    pids = container_pids(docker_client, container)
    assert pids
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)  # NVML reports these: they must be this host's


def test_a_stopped_container_has_no_reading(docker_client: docker.DockerClient, container: str) -> None:
    docker_client.api.stop(container, timeout=0)
    assert container_memory(docker_client, container) is None


@pytest.fixture
def handle(docker_client: docker.DockerClient, container: str) -> Iterator[DockerHandle]:
    """The gateway's handle for that container: its SDK calls run in the runtime's pool."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield DockerHandle(DockerHost(DockerNode(), pool), docker_client.containers.get(container), "", keep=True)


async def test_a_docker_handle_reads_its_cgroup_and_host_pids(handle: DockerHandle) -> None:
    assert isinstance(handle, ContainerEngine)
    reading = await handle.container_memory(with_pids=True)
    assert reading.cgroup_bytes is not None and reading.cgroup_bytes >= 90 * MIB
    assert reading.pids and all(Path(f"/proc/{pid}").exists() for pid in reading.pids)
    assert (await handle.container_memory(with_pids=False)).pids == ()


async def test_a_stopped_docker_handle_reads_nothing(docker_client: docker.DockerClient, handle: DockerHandle) -> None:
    docker_client.api.stop(handle.container_id, timeout=0)
    reading = await handle.container_memory(with_pids=True)
    assert reading.cgroup_bytes is None and reading.pids == ()


async def test_the_sampler_reads_a_container_through_its_handle(handle: DockerHandle, tmp_path: Path) -> None:
    """The same path the gateway takes: the sampler asks the engine (ContainerEngine), the handle asks Docker."""
    with SampleStore(tmp_path / "stats.sqlite3") as store:
        [sample] = await Sampler(FakeWaker(status("boxed", ModelState.READY, handle)), store,
                                 nvml=False).sample_once()
    assert sample.cgroup is not None and sample.cgroup >= 90 * MIB / GIB
    assert sample.rss is None and sample.phase == "steady"
