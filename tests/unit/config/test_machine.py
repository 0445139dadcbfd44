"""Each node's total memory from its machine: the rules (configured wins, local vs remote, fallbacks) with stand-in
readers, and this machine's reader against a stand-in NVML and a fixture /proc/meminfo. No GPU or daemon needed."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings
from waker import compose
from waker.config.machine import DEFAULT_TOTAL_GB, MemoryReading, is_resolved, resolve_nodes
from waker.config.nodes import NodeConfig
from waker.runtime.docker.memory_probe import NodeUnreachable
from waker.runtime.machine import read_local_memory
from waker.runtime.memory import GIB

UNIFIED = MemoryReading(119.7, True, "/proc/meminfo MemTotal (unified memory)")
DISCRETE = MemoryReading(160.0, False, "NVML: 2 GPUs")


@pytest.fixture(autouse=True)
def no_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("SPARKGATE_NODES", raising=False)


class Readers:
    """Stand-in readers that count their calls."""

    def __init__(self, local: MemoryReading = UNIFIED, remote: MemoryReading | None = None) -> None:
        self.here = local
        self.there = remote or MemoryReading(121.5, None, "Docker info of {url}")
        self.local_calls = 0
        self.remote_calls: list[str] = []

    def local(self) -> MemoryReading:
        self.local_calls += 1
        return self.here

    def remote(self, url: str) -> MemoryReading:
        self.remote_calls.append(url)
        return MemoryReading(self.there.total_gb, self.there.unified, self.there.source.format(url=url))

    def resolve(self, nodes: dict[str, NodeConfig]) -> dict[str, NodeConfig]:
        return resolve_nodes(nodes, local=self.local, remote=self.remote)


def test_a_local_node_takes_this_machines_total_and_kind() -> None:
    readers = Readers(UNIFIED)
    node = readers.resolve({"local": NodeConfig()})["local"]
    assert (node.total_gb, node.total_source, node.unified_memory) == (
        119.7, "/proc/meminfo MemTotal (unified memory)", True)
    readers = Readers(DISCRETE)
    node = readers.resolve({"local": NodeConfig(docker_host="unix:///run/docker.sock")})["local"]
    assert (node.total_gb, node.total_source, node.unified_memory) == (160.0, "NVML: 2 GPUs", False)
    assert readers.remote_calls == []


def test_a_total_read_from_the_machine_is_rounded_down_to_a_tenth() -> None:
    node = Readers(MemoryReading(23.5401, False, "/proc/meminfo MemTotal (no GPU: no NVIDIA driver)")).resolve(
        {"local": NodeConfig()})["local"]
    assert node.total_gb == 23.5  # messages read "23.5 GB"; never more than the machine has
    assert Readers(MemoryReading(119.99, True, "x")).resolve({"local": NodeConfig()})["local"].total_gb == 119.9
    assert Readers(MemoryReading(24.0, True, "x")).resolve({"local": NodeConfig()})["local"].total_gb == 24.0


def test_a_configured_total_wins_but_a_local_node_still_learns_whether_its_memory_is_unified() -> None:
    readers = Readers(UNIFIED)
    node = readers.resolve({"local": NodeConfig(total_gb=100)})["local"]
    assert (node.total_gb, node.total_source, node.unified_memory) == (100, "configured", True)
    # Both configured: nothing to read.
    readers = Readers(UNIFIED)
    node = readers.resolve({"local": NodeConfig(total_gb=64, unified_memory=False)})["local"]
    assert (node.total_gb, node.total_source, node.unified_memory, readers.local_calls) == (64, "configured", False, 0)


def test_a_remote_node_takes_its_docker_daemons_total_and_its_kind_stays_unknown() -> None:
    readers = Readers()
    nodes = readers.resolve({"spark2": NodeConfig(docker_host="ssh://me@spark2"),
                             "spark3": NodeConfig(docker_host="tcp://10.0.0.3:2375", unified_memory=True),
                             "fixed": NodeConfig(docker_host="ssh://me@fixed", total_gb=50)})
    assert (nodes["spark2"].total_gb, nodes["spark2"].total_source, nodes["spark2"].unified_memory) == (
        121.5, "Docker info of ssh://me@spark2", None)
    assert nodes["spark3"].unified_memory is True  # configured
    assert (nodes["fixed"].total_gb, nodes["fixed"].total_source) == (50, "configured")
    assert readers.remote_calls == ["ssh://me@spark2", "tcp://10.0.0.3:2375"]  # not the configured one
    assert readers.local_calls == 0


def test_docker_host_from_the_environment_makes_the_default_node_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "ssh://me@elsewhere")
    readers = Readers()
    node = readers.resolve({"local": NodeConfig()})["local"]
    assert node.total_source == "Docker info of ssh://me@elsewhere"
    assert readers.local_calls == 0


def test_an_unreadable_node_gets_a_sparks_121_7_with_the_reason_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    readers = Readers(remote=MemoryReading(None, None, "Docker at ssh://me@spark2 is unreachable: timed out"))
    with caplog.at_level(logging.WARNING, logger="sparkgate.config"):
        node = readers.resolve({"spark2": NodeConfig(docker_host="ssh://me@spark2")})["spark2"]
    assert node.total_gb == DEFAULT_TOTAL_GB == 121.7
    assert node.total_source == "default 121.7: Docker at ssh://me@spark2 is unreachable: timed out"
    assert "spark2" in caplog.text and "set total_gb" in caplog.text
    readers = Readers(local=MemoryReading(None, None, "NVML unavailable: No permission"))
    node = readers.resolve({"local": NodeConfig()})["local"]
    assert (node.total_gb, node.total_source, node.unified_memory) == (
        121.7, "default 121.7: NVML unavailable: No permission", None)


def test_this_machine_is_read_once_and_resolved_nodes_are_not_read_again() -> None:
    readers = Readers(UNIFIED)
    nodes = readers.resolve({"a": NodeConfig(), "b": NodeConfig(docker_host="unix:///var/run/docker.sock")})
    assert readers.local_calls == 1
    assert all(is_resolved(n) for n in nodes.values())
    again = readers.resolve(nodes)
    assert readers.local_calls == 1
    assert again == nodes
    assert not is_resolved(NodeConfig()) and not is_resolved(NodeConfig(total_gb=10))


def test_the_source_cant_be_set_in_the_settings_and_isnt_dumped() -> None:
    with pytest.raises(ValidationError, match="set by the gateway"):
        NodeConfig.model_validate({"total_source": "made up"})
    node = Readers().resolve({"local": NodeConfig()})["local"]
    assert "total_source" not in node.model_dump()


def test_compose_resolves_the_gateways_nodes_with_the_readers_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", '{"local": {}, "spark2": {"docker_host": "ssh://me@spark2"}}')
    readers = Readers(MemoryReading(23.4, False, "/proc/meminfo MemTotal (no GPU: no NVIDIA driver)"))
    nodes = compose.resolve_nodes(GatewaySettings().nodes, local=readers.local, remote=readers.remote)
    budgets = compose.budgets(nodes)  # resolved: read nothing again
    assert (budgets["local"].total_gb, budgets["local"].capacity_gb) == (23.4, pytest.approx(15.4))
    assert budgets["spark2"].total_gb == 121.5
    assert readers.local_calls == 1 and readers.remote_calls == ["ssh://me@spark2"]


def test_compose_reads_a_remote_total_from_docker_info_and_says_when_it_cant(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: dict[str, Any] = {"ssh://me@up": 128 * GIB, "ssh://me@blank": None}
    closed: list[str] = []

    class FakeMemInfo:
        def __init__(self, url: str) -> None:
            self.url = url

        def total_bytes(self) -> int | None:
            if self.url not in answers:
                raise NodeUnreachable(f"Docker at {self.url} is unreachable: timed out")
            return answers[self.url]

        def close(self) -> None:
            closed.append(self.url)

    monkeypatch.setattr(compose, "DockerMemInfo", FakeMemInfo)
    assert compose.read_remote_memory("ssh://me@up") == MemoryReading(128.0, None, "Docker info of ssh://me@up")
    assert compose.read_remote_memory("ssh://me@blank").total_gb is None
    down = compose.read_remote_memory("ssh://me@down")
    assert (down.total_gb, down.source) == (None, "Docker at ssh://me@down is unreachable: timed out")
    assert closed == ["ssh://me@up", "ssh://me@blank", "ssh://me@down"]


# --- this machine: NVML and /proc/meminfo ----------------------------------------------------------------------------

NOT_SUPPORTED, NO_PERMISSION, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND = 3, 4, 9, 12


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """The NVML calls the reader makes; ``totals`` in bytes per GPU, or an error code on init or per device."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_ERROR_DRIVER_NOT_LOADED = DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = LIBRARY_NOT_FOUND

    def __init__(self, totals: list[int], *, init_error: int | None = None, read_error: int | None = None) -> None:
        self.totals, self.init_error, self.read_error = totals, init_error, read_error
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.totals)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        if self.read_error is not None:
            raise NVMLError(self.read_error)
        return SimpleNamespace(total=self.totals[handle], free=self.totals[handle])


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       125829120 kB\nMemAvailable:   104333312 kB\n")  # 120 GiB
    return path


def test_discrete_gpus_sum_their_totals_from_nvml(meminfo: Path) -> None:
    nvml = FakeNvml([80 * GIB, 80 * GIB])
    assert read_local_memory(nvml, meminfo) == MemoryReading(160.0, False, "NVML: 2 GPUs")
    assert nvml.shutdowns == 1
    assert read_local_memory(FakeNvml([24 * GIB]), meminfo).source == "NVML: 1 GPU"


def test_unified_memory_reads_memtotal(meminfo: Path) -> None:
    # GB10: nvmlDeviceGetMemoryInfo answers NOT_SUPPORTED; the GPU's memory is the system's.
    reading = read_local_memory(FakeNvml([0], read_error=NOT_SUPPORTED), meminfo)
    assert reading == MemoryReading(120.0, True, "/proc/meminfo MemTotal (unified memory)")


@pytest.mark.parametrize(("nvml", "why"), [
    (FakeNvml([], init_error=LIBRARY_NOT_FOUND), "no NVIDIA driver"),
    (FakeNvml([], init_error=DRIVER_NOT_LOADED), "no NVIDIA driver"),
    (FakeNvml([]), "NVML sees none"),
])
def test_a_machine_without_a_gpu_reads_memtotal(meminfo: Path, nvml: FakeNvml, why: str) -> None:
    assert read_local_memory(nvml, meminfo) == MemoryReading(120.0, False, f"/proc/meminfo MemTotal (no GPU: {why})")


def test_without_nvidia_ml_py_the_machine_has_no_gpu(meminfo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    reading = read_local_memory(None, meminfo)
    assert (reading.total_gb, reading.unified) == (120.0, False)
    assert reading.source.startswith("/proc/meminfo MemTotal (no GPU: nvidia-ml-py not installed")


def test_other_nvml_failures_give_no_total_rather_than_host_ram(meminfo: Path) -> None:
    # A box with GPUs NVML can't read: MemTotal would be the wrong memory, so the caller falls back and warns.
    reading = read_local_memory(FakeNvml([80 * GIB], read_error=NO_PERMISSION), meminfo)
    assert (reading.total_gb, reading.unified) == (None, None)
    assert reading.source.startswith("NVML unavailable")
    assert read_local_memory(FakeNvml([], init_error=NO_PERMISSION), meminfo).total_gb is None


def test_an_unreadable_meminfo_gives_no_total(tmp_path: Path) -> None:
    reading = read_local_memory(FakeNvml([]), tmp_path / "absent")
    assert (reading.total_gb, reading.unified) == (None, False)
    (tmp_path / "garbled").write_text("MemFree: 1 kB\n")
    assert read_local_memory(FakeNvml([]), tmp_path / "garbled").total_gb is None
