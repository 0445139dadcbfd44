"""Real processes that hold a known amount of memory, a stand-in NVML, and stand-in wakers and engines (the read
model and the engine protocols the sampler reads), for the stats tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from tests.docker.conftest import docker_client, model_name  # noqa: F401  (fixtures for the Docker tests here)
from waker.config.spec import ModelSpec
from waker.runtime.base import ContainerMemory
from waker.state import ModelState
from waker.status import ModelStatus, WakerStatus

MIB = 1024 * 1024

# Forks `children` more processes (same process group), then each allocates and touches `mb` MiB, says "ready" and
# waits: a process group whose memory the test knows.
HOG = r"""
import os, sys, time
mb, children = int(sys.argv[1]), int(sys.argv[2])
for _ in range(children):
    if os.fork() == 0:
        break
buf = bytearray(mb * 1024 * 1024)
for i in range(0, len(buf), 4096):
    buf[i] = 1
os.write(1, b"ready\n")  # one write: the group's lines never interleave
time.sleep(600)
"""


@dataclass
class Hog:
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def memory_hog() -> Iterator[Callable[..., Hog]]:
    """Start a process group of `1 + children` processes holding `mb` MiB each, in its own session like an engine;
    everything is killed afterwards."""
    hogs: list[Hog] = []

    def start(mb: int, children: int = 0) -> Hog:
        proc = subprocess.Popen([sys.executable, "-c", HOG, str(mb), str(children)], stdout=subprocess.PIPE,
                                start_new_session=True)
        hog = Hog(proc)
        hogs.append(hog)
        assert proc.stdout is not None
        for _ in range(children + 1):
            assert proc.stdout.readline() == b"ready\n"
        return hog

    yield start
    for hog in hogs:
        hog.kill()


class NVMLError(Exception):
    """Like pynvml's: carries the NVML return code in `value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


NVML_ERROR_NOT_SUPPORTED = 3


@dataclass
class FakeNvml:
    """A stand-in for pynvml: `devices[i]` is the list of (pid, used bytes or None) on GPU i, or an NVML return code
    that the per-process query raises (3: NOT_SUPPORTED, as a unified-memory GB10 may answer)."""

    devices: list[list[tuple[int, int | None]] | int] = field(default_factory=list)
    init_error: int | None = None
    initialised: int = 0

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        device = self.devices[handle]
        if isinstance(device, int):
            raise NVMLError(device)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device]


@dataclass(frozen=True)
class ProcessGroup:
    """An engine that is a process group here (the ProcessGroupEngine protocol), as ProcessHandle is."""

    process_group: int


@dataclass
class Container:
    """An engine in a container (the ContainerEngine protocol), as DockerHandle is: answers `reading`, or raises
    it; records whether pids were asked for."""

    reading: ContainerMemory | Exception
    asked_pids: list[bool] = field(default_factory=list)

    async def container_memory(self, with_pids: bool) -> ContainerMemory:
        self.asked_pids.append(with_pids)
        if isinstance(self.reading, Exception):
            raise self.reading
        return self.reading if with_pids else ContainerMemory(self.reading.cgroup_bytes)


def status(name: str, state: ModelState, engine: object, placed: tuple[str, ...] = ()) -> ModelStatus:
    spec = ModelSpec(name=name, command=["engine"])
    return ModelStatus(name=name, spec=spec, state=state, since=0.0, engine=engine, placed=placed)  # type: ignore[arg-type]


class FakeWaker:
    """Anything with describe(): here, a fixed list of model statuses."""

    def __init__(self, *models: ModelStatus) -> None:
        self.models = list(models)

    def describe(self) -> WakerStatus:
        return WakerStatus(now=0.0, models=tuple(self.models), nodes=(), routes={m.name: m.name for m in self.models})
