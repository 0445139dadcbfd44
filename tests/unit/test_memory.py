"""Live memory probes, against a fixture /proc/meminfo and a stand-in NVML: no GPU needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from waker.memory import GIB, FixedProbe, MemInfoProbe, NvmlProbe, make_probe

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
    code = "import sys; sys.modules['pynvml'] = None; import waker.memory as m; print(type(m.make_probe()).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "MemInfoProbe"
