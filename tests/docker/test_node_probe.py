"""A node's memory read through its Docker daemon: the local daemon stands in for a remote DGX Spark.

Containers see the host's /proc/meminfo, so what the probe reads through Docker must be this machine's figures.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from gateway.settings import GatewaySettings
from tests.docker.conftest import IMAGE
from waker import compose
from waker.runtime.docker.container import LABEL_INSTANCE, LABEL_MANAGED, LABEL_MODEL
from waker.runtime.docker.memory_probe import LABEL_MEMORY_PROBE, DockerMemInfo, DockerMemoryProbe
from waker.runtime.memory import GIB, meminfo_gb

pytestmark = pytest.mark.docker

SOCKET = "unix:///var/run/docker.sock"


def here(key: str) -> float:
    value = meminfo_gb(Path("/proc/meminfo").read_text(), key)
    assert value is not None
    return value


def assert_reads_this_machine(probe: DockerMemoryProbe) -> None:
    total, free = probe.total_gb(), probe.free_gb()
    assert total == here("MemTotal")  # Docker's MemTotal is /proc/meminfo's, in bytes
    assert free is not None
    assert abs(free - here("MemAvailable")) < 0.05 * total, (free, here("MemAvailable"))


class NoEnginesHere(DockerMemInfo):
    """The real reader, blind to running engines: other tests on this daemon may be running some of ours."""

    def meminfo_by_exec(self) -> str | None:
        return None


@pytest.fixture
def engine(docker_client: docker.DockerClient, model_name: str) -> Iterator[str]:
    """A running container of ours (it only sleeps; the probe needs nothing more of it)."""
    container = docker_client.containers.run(
        IMAGE, ["sleep", "infinity"], detach=True, init=True, network_mode="none",
        labels={LABEL_MANAGED: "true", LABEL_MODEL: model_name, LABEL_INSTANCE: f"test-{model_name}"},
    )
    yield container.id
    container.remove(force=True)


def probe_containers(client: docker.DockerClient) -> list[str]:
    # The raw listing: the SDK's would inspect each one, and a throwaway one may be gone by then.
    return [c["Id"] for c in client.api.containers(all=True, filters={"label": f"{LABEL_MEMORY_PROBE}=true"})]


def test_reads_the_node_by_exec_in_a_running_engine_of_ours(engine: str) -> None:
    probe = DockerMemoryProbe(SOCKET, node="as-if-remote", autostart=False)
    try:
        probe.refresh()
        assert probe.source == "exec"
        assert_reads_this_machine(probe)
    finally:
        probe.close()


def test_reads_the_node_by_a_throwaway_container_when_no_engine_runs(docker_client: docker.DockerClient) -> None:
    before = set(probe_containers(docker_client))
    probe = DockerMemoryProbe(SOCKET, node="as-if-remote", autostart=False, source=NoEnginesHere(SOCKET, image=IMAGE))
    try:
        probe.refresh()
        assert probe.source == "run"
        assert_reads_this_machine(probe)
    finally:
        probe.close()
    deadline = time.monotonic() + 10
    while set(probe_containers(docker_client)) - before and time.monotonic() < deadline:  # removal may lag a moment
        time.sleep(0.1)
    assert not set(probe_containers(docker_client)) - before  # the throwaway container is gone


def test_throwaway_container_finds_an_image_by_itself(docker_client: docker.DockerClient) -> None:
    reader = NoEnginesHere(SOCKET)  # no image named: it picks from what the node has (the test image at least)
    try:
        text = reader.meminfo_by_run()
    finally:
        reader.close()
    assert text is not None
    assert meminfo_gb(text, "MemTotal") == here("MemTotal")


def test_unreachable_daemon_gives_unknown_without_raising() -> None:
    probe = DockerMemoryProbe("tcp://127.0.0.1:1", node="gone", autostart=False)
    probe.refresh()
    probe.refresh()
    assert (probe.free_gb(), probe.total_gb()) == (None, None)
    probe.close()


def test_remote_node_in_settings_gets_a_docker_probe_that_refreshes_in_the_background(
        docker_client: docker.DockerClient) -> None:
    settings = GatewaySettings(nodes={"local": {"memory_probe": "none"},
                                      "spark2": {"docker_host": SOCKET, "memory_probe": "docker",
                                                 "memory_probe_interval": "1s"}})
    probe = compose.probes(settings.nodes)["spark2"]
    assert isinstance(probe, DockerMemoryProbe)
    probe.start()
    try:
        deadline = time.monotonic() + 30
        while probe.free_gb() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_reads_this_machine(probe)
        assert probe.total_gb() == pytest.approx(docker_client.info()["MemTotal"] / GIB)
    finally:
        probe.close()
