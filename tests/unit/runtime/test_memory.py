"""Live memory probes, against a fixture /proc/meminfo, a stand-in NVML and a stand-in node: no GPU or daemon needed."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from waker.clock import FakeClock
from waker.runtime.docker.memory_probe import DockerMemInfo, DockerMemoryProbe, NodeUnreachable
from waker.runtime.memory import GIB, FixedProbe, MemInfoProbe, NvmlProbe, make_probe, meminfo_gb

# The stand-in mirrors pynvml: NVMLError(value) turns itself into a generated subclass named after the code, so
# `except pynvml.NVMLError_NotSupported` and `exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED` both work.
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15


class NVMLError(Exception):
    _by_value: dict[int, type[NVMLError]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._by_value.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj


def _error_class(name: str, value: int) -> type[NVMLError]:
    def new(typ: type[NVMLError], *args: object) -> NVMLError:
        return NVMLError.__new__(typ, value)

    cls = type(name, (NVMLError,), {"__new__": new})
    NVMLError._by_value[value] = cls
    return cls


STAND_IN_ERRORS = SimpleNamespace(
    NVMLError=NVMLError,
    NVMLError_InvalidArgument=_error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT),
    NVMLError_NotSupported=_error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED),
    NVMLError_NoPermission=_error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION),
    NVMLError_DriverNotLoaded=_error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED),
    NVMLError_LibraryNotFound=_error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND),
    NVMLError_GpuIsLost=_error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST),
    NVML_ERROR_INVALID_ARGUMENT=NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NOT_SUPPORTED=NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_NO_PERMISSION=NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_DRIVER_NOT_LOADED=NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_LIBRARY_NOT_FOUND=NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST=NVML_ERROR_GPU_IS_LOST,
)


def _real_pynvml_errors() -> Any:
    return pytest.importorskip("pynvml")


ERRORS = [pytest.param(lambda: STAND_IN_ERRORS, id="stand-in"), pytest.param(_real_pynvml_errors, id="pynvml")]


class FakeNvml:
    """The five NVML calls the probe makes. ``memory`` is (free, total) bytes per device, changeable between reads."""

    def __init__(self, memory: list[tuple[int, int]], errors: Any = STAND_IN_ERRORS) -> None:
        self.memory = memory
        self.errors = errors
        self.NVMLError = errors.NVMLError
        self.NVMLError_NotSupported = errors.NVMLError_NotSupported
        self.NVML_ERROR_NOT_SUPPORTED = errors.NVML_ERROR_NOT_SUPPORTED
        self.NVML_ERROR_LIBRARY_NOT_FOUND = errors.NVML_ERROR_LIBRARY_NOT_FOUND
        self.NVML_ERROR_DRIVER_NOT_LOADED = errors.NVML_ERROR_DRIVER_NOT_LOADED
        self.init_error: int | None = None
        self.read_error: int | None = None
        self.init_calls = 0
        self.handle_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.errors.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        self.handle_calls += 1
        if not 0 <= index < len(self.memory):
            raise self.errors.NVMLError(self.errors.NVML_ERROR_INVALID_ARGUMENT)
        return ("handle", index)

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> SimpleNamespace:
        if self.read_error is not None:
            raise self.errors.NVMLError(self.read_error)
        free, total = self.memory[handle[1]]
        return SimpleNamespace(free=free, total=total, used=total - free)


MEMINFO = """\
MemTotal:       125829120 kB
MemFree:          1048576 kB
MemAvailable:   104333312 kB
Buffers:            12345 kB
Cached:         98765432 kB
"""


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    return path


# --- /proc/meminfo -------------------------------------------------------------------------------------------------


def test_meminfo_free_is_mem_available_in_exact_gib(meminfo: Path) -> None:
    probe = MemInfoProbe(meminfo)
    assert probe.name == "meminfo"
    assert probe.free_gb() == 99.5  # 104333312 kB = 99.5 GiB, not MemFree's 1 GiB
    assert probe.total_gb() == 120.0


def test_meminfo_is_reread_on_every_call(meminfo: Path) -> None:
    probe = MemInfoProbe(str(meminfo))
    meminfo.write_text(MEMINFO.replace("104333312", "1572864"))
    assert probe.free_gb() == 1.5


def test_meminfo_without_mem_available_line_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       125829120 kB\nMemFree:          1048576 kB\n")
    probe = MemInfoProbe(path)
    assert probe.free_gb() is None
    assert probe.total_gb() == 120.0


def test_meminfo_unreadable_or_garbled_is_unknown(tmp_path: Path) -> None:
    assert MemInfoProbe(tmp_path / "absent").free_gb() is None
    garbled = tmp_path / "garbled"
    garbled.write_text("MemAvailable: lots kB\nMemTotal:\n")
    assert MemInfoProbe(garbled).free_gb() is None
    assert MemInfoProbe(garbled).total_gb() is None


# --- NVML ----------------------------------------------------------------------------------------------------------


def test_nvml_sums_free_and_total_over_all_devices() -> None:
    nvml = FakeNvml([(10 * GIB, 80 * GIB), (GIB // 2, 80 * GIB)])
    probe = NvmlProbe(nvml=nvml)
    assert probe.name == "nvml"
    assert probe.free_gb() == 10.5
    assert probe.total_gb() == 160.0


def test_nvml_sums_only_the_selected_devices() -> None:
    nvml = FakeNvml([(1 * GIB, 80 * GIB), (2 * GIB, 80 * GIB), (4 * GIB, 80 * GIB)])
    assert NvmlProbe(devices=[0, 2], nvml=nvml).free_gb() == 5.0
    assert NvmlProbe(devices=[1], nvml=nvml).free_gb() == 2.0
    assert NvmlProbe(devices=[1], nvml=nvml).total_gb() == 80.0


def test_nvml_initialises_once_lazily_and_keeps_handles() -> None:
    nvml = FakeNvml([(8 * GIB, 80 * GIB), (8 * GIB, 80 * GIB)])
    probe = NvmlProbe(nvml=nvml)
    assert nvml.init_calls == 0
    for _ in range(5):
        probe.free_gb()
    assert nvml.init_calls == 1
    assert nvml.handle_calls == 2


def test_nvml_reads_are_live() -> None:
    nvml = FakeNvml([(70 * GIB, 80 * GIB)])
    probe = NvmlProbe(nvml=nvml)
    assert probe.free_gb() == 70.0
    nvml.memory[0] = (30 * GIB, 80 * GIB)
    assert probe.free_gb() == 30.0


@pytest.mark.parametrize("errors", ERRORS)
def test_nvml_read_failure_at_runtime_is_unknown_not_an_exception(errors: Any) -> None:
    nvml = FakeNvml([(70 * GIB, 80 * GIB)], errors=errors())
    probe = NvmlProbe(nvml=nvml)
    assert probe.free_gb() == 70.0
    nvml.read_error = nvml.errors.NVML_ERROR_GPU_IS_LOST
    assert probe.free_gb() is None
    assert probe.total_gb() is None
    nvml.read_error = None
    assert probe.free_gb() == 70.0
    assert probe.name == "nvml"


@pytest.mark.parametrize("errors", ERRORS)
def test_nvml_not_supported_switches_that_probe_to_meminfo(errors: Any, meminfo: Path) -> None:
    nvml = FakeNvml([(0, 0)], errors=errors())
    nvml.read_error = nvml.errors.NVML_ERROR_NOT_SUPPORTED
    probe = NvmlProbe(nvml=nvml, fallback=MemInfoProbe(meminfo))
    assert probe.free_gb() == 99.5
    assert probe.name == "nvml->meminfo"
    nvml.read_error = None  # it stays on meminfo: "Not Supported" is a property of the GPU, not a passing failure
    assert probe.total_gb() == 120.0


def test_nvml_without_the_library_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert NvmlProbe().free_gb() is None


def test_nvml_device_index_out_of_range_is_a_clear_error() -> None:
    probe = NvmlProbe(devices=[0, 3], nvml=FakeNvml([(GIB, GIB)]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        probe.free_gb()


@pytest.mark.parametrize("errors", ERRORS)
def test_stand_in_raises_not_supported_the_way_pynvml_does(errors: Any) -> None:
    errs = errors()
    exc = errs.NVMLError(errs.NVML_ERROR_NOT_SUPPORTED)
    assert type(exc) is errs.NVMLError_NotSupported
    assert isinstance(exc, errs.NVMLError)
    assert exc.value == errs.NVML_ERROR_NOT_SUPPORTED
    assert errs.NVMLError_NotSupported().value == errs.NVML_ERROR_NOT_SUPPORTED


# --- make_probe ----------------------------------------------------------------------------------------------------


def _install(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_auto_takes_nvml_when_devices_report_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNvml([(60 * GIB, 80 * GIB), (20 * GIB, 80 * GIB)]))
    probe = make_probe("auto")
    assert isinstance(probe, NvmlProbe)
    assert probe.name == "nvml"
    assert probe.free_gb() == 80.0
    assert make_probe(devices=[1]).free_gb() == 20.0


@pytest.mark.parametrize("errors", ERRORS)
def test_auto_on_gb10_falls_back_to_meminfo_and_says_why(monkeypatch: pytest.MonkeyPatch, errors: Any) -> None:
    nvml = FakeNvml([(0, 0)], errors=errors())
    nvml.read_error = nvml.errors.NVML_ERROR_NOT_SUPPORTED  # what GB10 / DGX Spark answers: unified memory
    _install(monkeypatch, nvml)
    probe = make_probe("auto")
    assert isinstance(probe, MemInfoProbe)
    assert probe.name == "meminfo (NVML memory info not supported: unified memory)"


def test_auto_without_pynvml_falls_back_to_meminfo(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, None)
    probe = make_probe()
    assert isinstance(probe, MemInfoProbe)
    assert probe.name == "meminfo"


@pytest.mark.parametrize("errors", ERRORS)
@pytest.mark.parametrize("code", ["NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED"])
def test_auto_without_nvidia_library_or_driver_falls_back_to_meminfo(
    monkeypatch: pytest.MonkeyPatch, errors: Any, code: str
) -> None:
    nvml = FakeNvml([(GIB, GIB)], errors=errors())
    nvml.init_error = getattr(nvml.errors, code)
    _install(monkeypatch, nvml)
    probe = make_probe("auto")
    assert isinstance(probe, MemInfoProbe)
    assert probe.name == "meminfo"


def test_auto_with_nvml_but_no_gpu_falls_back_to_meminfo(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNvml([]))
    assert isinstance(make_probe("auto"), MemInfoProbe)


def test_auto_with_another_nvml_failure_is_unknown_rather_than_system_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([(GIB, GIB)])
    nvml.read_error = NVML_ERROR_NO_PERMISSION
    _install(monkeypatch, nvml)
    probe = make_probe("auto")
    assert isinstance(probe, FixedProbe)
    assert probe.free_gb() is None
    assert probe.name.startswith("none (NVML unavailable")


def test_nvml_kind_insists_on_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNvml([(3 * GIB, 80 * GIB)]))
    assert make_probe("nvml").free_gb() == 3.0
    _install(monkeypatch, None)
    with pytest.raises(ValueError, match="nvml"):
        make_probe("nvml")
    nvml = FakeNvml([(0, 0)])
    nvml.read_error = NVML_ERROR_NOT_SUPPORTED
    _install(monkeypatch, nvml)
    with pytest.raises(ValueError, match="unified memory"):
        make_probe("nvml")


def test_device_index_out_of_range_is_an_error_even_for_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNvml([(GIB, GIB)]))
    with pytest.raises(ValueError, match="1 GPU"):
        make_probe("auto", devices=[1])


def test_meminfo_and_none_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeNvml([(GIB, GIB)]))
    assert isinstance(make_probe("meminfo"), MemInfoProbe)
    none = make_probe("none")
    assert isinstance(none, FixedProbe)
    assert none.name == "none"
    assert none.free_gb() is None
    assert none.total_gb() is None


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown memory probe 'cuda'"):
        make_probe("cuda")


def test_fixed_probe_is_constant() -> None:
    probe = FixedProbe(free_gb=12.5, total_gb=128.0)
    assert (probe.name, probe.free_gb(), probe.total_gb()) == ("fixed", 12.5, 128.0)


def test_module_imports_without_pynvml() -> None:
    code = ("import sys; sys.modules['pynvml'] = None; import waker.runtime.memory as m; "
            "print(type(m.make_probe()).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "MemInfoProbe"


def test_meminfo_gb_reads_one_line_of_the_text() -> None:
    assert meminfo_gb(MEMINFO, "MemAvailable") == 99.5
    assert meminfo_gb(MEMINFO, "MemTotal") == 120.0
    assert meminfo_gb(MEMINFO, "SwapTotal") is None
    assert meminfo_gb("MemAvailable: lots kB\n", "MemAvailable") is None


# --- a node's memory through its Docker daemon -----------------------------------------------------------------------


class FakeNode:
    """What DockerMemoryProbe asks a node for; each answer is set by the test, and every call is counted."""

    def __init__(self, exec_text: str | None = MEMINFO, run_text: str | None = MEMINFO,
                 total: int | None = 120 * GIB) -> None:
        self.exec_text = exec_text
        self.run_text = run_text
        self.total = total
        self.down: str | None = None  # a reason: every call raises NodeUnreachable
        self.calls: list[str] = []
        self.closed = False
        self.read = threading.Event()  # set when a read began
        self.gate = threading.Event()  # a read finishes only once this is set (a slow daemon, when cleared)
        self.gate.set()

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down is not None:
            raise NodeUnreachable(self.down)

    def total_bytes(self) -> int | None:
        self._call("info")
        return self.total

    def meminfo_by_exec(self) -> str | None:
        self._call("exec")
        self.read.set()
        self.gate.wait(10.0)
        return self.exec_text

    def meminfo_by_run(self) -> str | None:
        self._call("run")
        return self.run_text

    def close(self) -> None:
        self.closed = True


def docker_probe(node: FakeNode, clock: FakeClock, **kwargs: Any) -> DockerMemoryProbe:
    return DockerMemoryProbe("ssh://me@spark2", node="spark2", interval=5.0, clock=clock, source=node,
                             autostart=False, **kwargs)


def test_docker_probe_is_unknown_until_its_first_reading() -> None:
    probe = docker_probe(FakeNode(), FakeClock())
    assert probe.name == "docker (ssh://me@spark2)"
    assert (probe.free_gb(), probe.total_gb(), probe.source) == (None, None, None)


def test_docker_probe_serves_mem_available_read_by_exec_and_total_from_docker_info() -> None:
    node = FakeNode(total=128 * GIB)
    probe = docker_probe(node, FakeClock())
    probe.refresh()
    assert (probe.free_gb(), probe.total_gb(), probe.source) == (99.5, 128.0, "exec")
    assert node.calls == ["info", "exec"]  # an exec that works needs no throwaway container
    probe.refresh()
    assert node.calls == ["info", "exec", "exec"]  # the total is read once


def test_docker_probe_serves_the_cached_reading_without_touching_the_node() -> None:
    node = FakeNode()
    probe = docker_probe(node, FakeClock())
    probe.refresh()
    calls = len(node.calls)
    for _ in range(100):  # every admission step asks: none of them may reach the node
        assert probe.free_gb() == 99.5
    assert len(node.calls) == calls


def test_docker_probe_takes_the_total_from_meminfo_when_docker_info_lacks_it() -> None:
    probe = docker_probe(FakeNode(total=None), FakeClock())
    probe.refresh()
    assert probe.total_gb() == 120.0


def test_docker_probe_reading_goes_unknown_when_older_than_three_intervals() -> None:
    clock = FakeClock()
    probe = docker_probe(FakeNode(), clock)
    probe.refresh()
    clock.advance(15.0)
    assert probe.free_gb() == 99.5
    clock.advance(0.1)
    assert probe.free_gb() is None  # a node gone quiet must not keep offering memory it may no longer have
    assert probe.total_gb() == 120.0  # the total doesn't change


def test_docker_probe_max_age_can_be_set() -> None:
    clock = FakeClock()
    probe = docker_probe(FakeNode(), clock, max_age=1.0)
    probe.refresh()
    clock.advance(1.5)
    assert probe.free_gb() is None


def test_docker_probe_follows_the_node_between_refreshes() -> None:
    node = FakeNode()
    probe = docker_probe(node, FakeClock())
    probe.refresh()
    node.exec_text = MEMINFO.replace("104333312", "1572864")
    assert probe.free_gb() == 99.5  # the cache until the next refresh
    probe.refresh()
    assert probe.free_gb() == 1.5


def test_docker_probe_runs_a_throwaway_container_at_most_every_run_every_seconds() -> None:
    clock = FakeClock()
    node = FakeNode(exec_text=None)  # no engine of ours runs there
    probe = docker_probe(node, clock)  # run_every defaults to 2 intervals: 10 s
    probe.refresh()
    assert (probe.free_gb(), probe.source) == (99.5, "run")
    assert node.calls == ["info", "exec", "run"]
    clock.advance(5.0)
    probe.refresh()  # not due: the reading of 5 s ago stays
    assert node.calls[-2:] == ["run", "exec"]
    assert probe.free_gb() == 99.5
    clock.advance(5.0)
    node.run_text = MEMINFO.replace("104333312", "1572864")
    probe.refresh()
    assert node.calls[-1] == "run"
    assert probe.free_gb() == 1.5


def test_docker_probe_prefers_exec_again_once_an_engine_runs() -> None:
    clock = FakeClock()
    node = FakeNode(exec_text=None)
    probe = docker_probe(node, clock)
    probe.refresh()
    node.exec_text = MEMINFO
    clock.advance(20.0)
    probe.refresh()
    assert node.calls[-1] == "exec"
    assert probe.source == "exec"


def test_docker_probe_with_nothing_to_read_by_is_unknown_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    node = FakeNode(exec_text=None, run_text=None)
    probe = docker_probe(node, clock)
    with caplog.at_level(logging.INFO, logger="sparkgate.memory"):
        for _ in range(5):
            probe.refresh()
            clock.advance(10.0)
    assert probe.free_gb() is None
    assert [r.message for r in caplog.records] == [
        "memory of node 'spark2' unknown: no container of ours runs there and no image there could run "
        "`cat /proc/meminfo`"
    ]


def test_docker_probe_of_an_unreachable_node_is_unknown_at_once_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    node = FakeNode()
    probe = docker_probe(node, clock)
    probe.refresh()
    node.down = "Connection refused"
    with caplog.at_level(logging.INFO, logger="sparkgate.memory"):
        for _ in range(10):
            probe.refresh()  # never raises
            assert probe.free_gb() is None  # not the last figure, although it is younger than max_age
            clock.advance(5.0)
        node.down = None
        probe.refresh()
    assert probe.free_gb() == 99.5
    assert [(r.levelname, r.message) for r in caplog.records] == [
        ("WARNING", "memory of node 'spark2' unknown: Connection refused"),
        ("INFO", "memory of node 'spark2' readable again"),
    ]


def test_docker_probe_meminfo_without_mem_available_is_unknown() -> None:
    node = FakeNode()
    probe = docker_probe(node, FakeClock())
    probe.refresh()
    node.exec_text = "MemTotal:       125829120 kB\n"
    probe.refresh()
    assert probe.free_gb() is None


def test_docker_probe_refreshes_in_its_own_thread_until_closed() -> None:
    node = FakeNode()
    probe = DockerMemoryProbe("tcp://spark2:2375", interval=0.01, source=node, autostart=False)
    probe.start()
    probe.start()  # idempotent
    assert node.read.wait(10.0)
    thread = probe._thread
    assert thread is not None
    probe.close()
    thread.join(10.0)
    assert not thread.is_alive()
    assert node.closed
    assert probe.free_gb() is None  # closed: no more readings, and no restart
    assert probe._thread is None


def test_docker_probe_starts_on_its_first_reading_when_nobody_started_it() -> None:
    node = FakeNode()
    node.gate.clear()  # a slow daemon
    probe = DockerMemoryProbe("tcp://spark2:2375", interval=0.01, source=node)
    assert probe.free_gb() is None  # the reading is made in the background: the caller never waits for it
    assert node.read.wait(10.0)
    assert probe.free_gb() is None
    node.gate.set()
    probe.close()


def test_docker_probe_closed_before_start_closes_its_client() -> None:
    node = FakeNode()
    probe = docker_probe(node, FakeClock())
    probe.close()
    assert node.closed
    probe.start()
    assert probe._thread is None


class FakeApi:
    """The low-level Docker API calls DockerMemInfo makes, answering from lists the test sets."""

    def __init__(self) -> None:
        self.running: list[dict[str, Any]] = []
        self.all: list[dict[str, Any]] = []
        self.images_: list[dict[str, Any]] = []
        self.exec_output: dict[str, tuple[int, bytes]] = {}
        self.execs: list[str] = []

    def containers(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        assert filters is not None and filters["label"] == "sparkgate.managed=true"
        return self.all if all else self.running

    def images(self) -> list[dict[str, Any]]:
        return self.images_

    def exec_create(self, container: str, cmd: list[str], stdout: bool, stderr: bool) -> dict[str, str]:
        assert cmd == ["cat", "/proc/meminfo"]
        self.execs.append(container)
        return {"Id": container}

    def exec_start(self, exec_id: str) -> bytes:
        return self.exec_output[exec_id][1]

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        return {"ExitCode": self.exec_output[exec_id][0]}


def mem_info_on(api: FakeApi) -> DockerMemInfo:
    reader = DockerMemInfo("tcp://spark2:2375")
    reader._client = SimpleNamespace(api=api, close=lambda: None)  # type: ignore[assignment]
    return reader


def test_exec_reads_through_the_first_running_container_of_ours_that_can() -> None:
    api = FakeApi()
    api.running = [{"Id": "no-cat"}, {"Id": "engine"}]
    api.exec_output = {"no-cat": (127, b"cat: not found"), "engine": (0, MEMINFO.encode())}
    assert mem_info_on(api).meminfo_by_exec() == MEMINFO
    assert api.execs == ["no-cat", "engine"]


def test_exec_without_a_running_container_of_ours_is_none() -> None:
    assert mem_info_on(FakeApi()).meminfo_by_exec() is None


def test_throwaway_images_are_ours_first_then_the_smallest() -> None:
    api = FakeApi()
    api.all = [{"ImageID": "sha256:vllm"}, {"ImageID": "sha256:vllm"}]
    api.images_ = [{"Id": "sha256:big", "Size": 9_000}, {"Id": "sha256:vllm", "Size": 20_000},
                   {"Id": "sha256:small", "Size": 5}]
    reader = mem_info_on(api)
    assert reader._candidates() == ["sha256:vllm", "sha256:small", "sha256:big"]
    reader._unusable.add("sha256:vllm")
    assert reader._candidates() == ["sha256:small", "sha256:big"]
    reader._image = "sha256:big"  # the one that worked last time goes first
    assert reader._candidates() == ["sha256:big", "sha256:small"]


def test_throwaway_images_all_unusable_are_tried_again_next_round() -> None:
    api = FakeApi()
    api.images_ = [{"Id": "sha256:scratch", "Size": 1}]
    reader = mem_info_on(api)
    reader._unusable.add("sha256:scratch")
    assert reader._candidates() == []
    assert reader._candidates() == ["sha256:scratch"]


def test_unreachable_daemon_is_node_unreachable_not_a_docker_error() -> None:
    reader = DockerMemInfo("tcp://127.0.0.1:1", timeout=2.0)
    with pytest.raises(NodeUnreachable, match=r"Docker at tcp://127\.0\.0\.1:1 is unreachable: Connection refused"):
        reader.total_bytes()
