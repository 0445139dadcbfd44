"""Container memory from the real Docker daemon, in the locally built test image."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest

from stats.readers import container_memory, container_pids
from stats.sampler import Sampler
from stats.store import SampleStore
from tests.docker.conftest import IMAGE
from tests.stats.conftest import MIB
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


async def test_the_sampler_reads_a_container_through_the_docker_node(
        docker_client: docker.DockerClient, container: str, tmp_path: Path) -> None:
    """The same path the gateway takes: DockerHandle._node.call runs the SDK call in the runtime's pool."""
    with ThreadPoolExecutor(max_workers=2) as pool, SampleStore(tmp_path / "stats.sqlite3") as store:
        handle = SimpleNamespace(container_id=container, _node=DockerHost(DockerNode(), pool))
        ctl = SimpleNamespace(spec=SimpleNamespace(name="boxed"), state=ModelState.READY, handle=handle)
        [sample] = await Sampler(SimpleNamespace(controllers=lambda: [ctl]), store, nvml=False).sample_once()
    assert sample.cgroup is not None and sample.cgroup >= 90 * MIB / GIB
    assert sample.rss is None and sample.phase == "steady"
