"""Live memory probes: how much memory could a new engine get right now?

The scheduler keeps a ledger of what it has promised to running engines, but the ledger cannot see memory taken by
anything else (another user's job, a desktop session, the page cache growing, an engine using more than it declared).
A probe reads the live figure so the scheduler can check its ledger against reality before it starts an engine.

Two sources, chosen by the kind of machine:

* Unified memory (NVIDIA GB10 / DGX Spark, 128 GB of LPDDR5x shared by CPU and GPU): there is no separate frame
  buffer. NVML's ``nvmlDeviceGetMemoryInfo`` answers ``NVML_ERROR_NOT_SUPPORTED`` (``nvidia-smi`` prints "Not
  Supported" under Memory-Usage), and ``cudaMemGetInfo`` reports roughly the kernel's MemFree, which ignores page cache
  the kernel would give back. GPU allocations come out of system RAM, so ``/proc/meminfo`` is the truth there:
  :class:`MemInfoProbe`.
* Discrete GPUs: the engine's weights and KV cache live in the cards' own memory, which ``/proc/meminfo`` cannot see;
  NVML reports it per device: :class:`NvmlProbe`.

:func:`make_probe` picks one. A node reached through its Docker daemon (another DGX Spark) is read by
``waker.runtime.docker.memory_probe.DockerMemoryProbe``, which parses that node's ``/proc/meminfo`` with
:func:`meminfo_gb`. All figures are GiB (``GIB`` bytes), like every "GB" in sparkgate.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GIB = 1024**3  # all "GB" figures in sparkgate are GiB

_KIB = 1024  # /proc/meminfo says "kB" but means KiB
_NVML_ERROR_NOT_SUPPORTED = 3  # pynvml.NVML_ERROR_NOT_SUPPORTED; a stand-in module may leave the constant out
_UNIFIED = "NVML memory info not supported: unified memory"


class MemInfoProbe:
    """Reads ``MemAvailable`` and ``MemTotal`` from ``/proc/meminfo``: the right source on unified-memory machines.

    ``MemAvailable`` rather than ``MemFree``: a box that has just read a 60 GB model file has most of it in page cache,
    so ``MemFree`` looks nearly empty although the kernel drops that cache the moment an engine asks for memory.
    ``MemAvailable`` is the kernel's own estimate of what can be allocated without swapping (free memory plus the
    reclaimable part of page cache and slab), which is what an engine can actually get. Kernels before 3.14 lack the
    line; we then say "unknown" rather than guess from ``MemFree``.

    The file is re-read on every call (it is a few hundred bytes from procfs, microseconds). Inside a container,
    ``/proc/meminfo`` shows the host's memory, not the cgroup's limit: run the gateway on the host.
    """

    def __init__(self, path: str | Path = "/proc/meminfo") -> None:
        self.name = "meminfo"
        self._path = Path(path)

    def free_gb(self) -> float | None:
        return self._read("MemAvailable")

    def total_gb(self) -> float | None:
        return self._read("MemTotal")

    def _read(self, key: str) -> float | None:
        try:
            text = self._path.read_text()
        except OSError:
            return None
        return meminfo_gb(text, key)


def meminfo_gb(text: str, key: str) -> float | None:
    """The ``key`` line of a ``/proc/meminfo`` text (``MemAvailable``, ``MemTotal``) in GiB; None if absent or garbled.

    Shared by :class:`MemInfoProbe` (this machine's file) and ``waker.runtime.docker.memory_probe`` (a node's file read
    through its Docker daemon), so both read the same figure the same way.
    """
    for line in text.splitlines():
        field, _, rest = line.partition(":")
        if field != key:
            continue
        parts = rest.split()
        try:
            kib = int(parts[0])
        except (IndexError, ValueError):
            return None
        return kib * _KIB / GIB
    return None


class NvmlProbe:
    """Sums NVML's free memory over the selected GPUs: the right source for discrete cards.

    ``devices`` are NVML indices (the order ``nvidia-smi`` shows, by PCI bus), not CUDA's, which may be ordered
    differently unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; None means every GPU NVML sees. ``nvml`` is the ``pynvml``
    module (package ``nvidia-ml-py``) or a stand-in for tests; by default it is imported on first use, so this module
    imports fine on machines with no NVIDIA library or driver.

    ``nvmlInit`` is called once, lazily, on the first reading, and the device handles are kept. A reading that fails
    (driver restarting, GPU lost) gives None instead of raising: the scheduler then relies on its ledger. A reading
    that NVML answers with "Not Supported" means the GPU has no memory of its own to report (GB10 and other
    unified-memory parts), so from then on this probe reads ``/proc/meminfo`` instead and says so in its name.
    """

    def __init__(self, devices: Sequence[int] | None = None, nvml: Any = None, *,
                 fallback: MemInfoProbe | None = None) -> None:
        self.name = "nvml"
        self._devices = list(devices) if devices is not None else None
        self._nvml = nvml
        self._fallback = fallback if fallback is not None else MemInfoProbe()
        self._use_fallback = False
        self._initialised = False
        self._handles: list[Any] | None = None
        self._lock = threading.Lock()

    def free_gb(self) -> float | None:
        return self._reading(0)

    def total_gb(self) -> float | None:
        return self._reading(1)

    def _reading(self, which: int) -> float | None:
        if self._use_fallback:
            return self._fallback.free_gb() if which == 0 else self._fallback.total_gb()
        try:
            figures = self.read_bytes()
        except (ImportError, NoGpuError):
            return None
        except Exception as exc:
            if not _is_nvml_error(self._nvml, exc):
                raise
            if not _is_not_supported(self._nvml, exc):
                return None
            self._use_fallback = True
            self.name = "nvml->meminfo"
            return self._reading(which)
        return figures[which] / GIB

    def read_bytes(self) -> tuple[int, int]:
        """(free, total) in bytes summed over the selected devices.

        Raises what stands in the way: ImportError (no nvidia-ml-py), the module's NVMLError, NoGpuError, or
        ValueError for a device index NVML doesn't have. :func:`make_probe` calls this once to find out whether NVML
        is usable here at all; :meth:`free_gb` and :meth:`total_gb` turn the runtime failures into None.
        """
        nvml, handles = self._open()
        free = total = 0
        for handle in handles:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            free += int(info.free)
            total += int(info.total)
        return free, total

    def _open(self) -> tuple[Any, list[Any]]:
        with self._lock:
            if self._nvml is None:
                import pynvml  # optional: nvidia-ml-py

                self._nvml = pynvml
            nvml = self._nvml
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
            if self._handles is None:
                count = int(nvml.nvmlDeviceGetCount())
                if count == 0:
                    raise NoGpuError("NVML sees no GPU")
                if self._devices is None:
                    indices: Sequence[int] = range(count)
                else:
                    bad = [i for i in self._devices if not 0 <= i < count]
                    if bad or not self._devices:
                        raise ValueError(f"GPU indices {self._devices} don't fit the {count} GPU(s) NVML sees")
                    indices = self._devices
                self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            return nvml, self._handles


class NoGpuError(RuntimeError):
    """NVML works but sees no GPU."""


class FixedProbe:
    """A constant reading: for tests, or to turn live checks off (``FixedProbe(free_gb=None)`` means "unknown")."""

    def __init__(self, free_gb: float | None = None, total_gb: float | None = None, name: str | None = None) -> None:
        self.name = name if name is not None else ("fixed" if free_gb is not None else "none")
        self._free = free_gb
        self._total = total_gb

    def free_gb(self) -> float | None:
        return self._free

    def total_gb(self) -> float | None:
        return self._total


def make_probe(kind: str = "auto", devices: Sequence[int] | None = None) -> MemInfoProbe | NvmlProbe | FixedProbe:
    """The probe for ``kind``: "auto", "meminfo", "nvml" or "none".

    "auto" takes NVML when it initialises and the selected devices report memory (discrete GPUs), and
    ``/proc/meminfo`` otherwise: when NVML is not installed, has no library or driver, or sees no GPU (a CPU-only
    box), and when the devices answer "Not Supported" (GB10 / DGX Spark, whose memory is the system's), in which case
    the name says why. Any other NVML failure (no permission, GPU lost, ...) gives an "unknown" probe rather than
    ``/proc/meminfo``: on a box with discrete GPUs, system RAM says nothing about what fits on the cards, and the
    ledger alone is the safer guide. "nvml" insists on NVML and raises ValueError when it can't be used. "none" turns
    live checks off. Device indices NVML doesn't have raise ValueError whatever the kind.
    """
    if kind == "meminfo":
        return MemInfoProbe()
    if kind == "none":
        return FixedProbe(free_gb=None)
    if kind not in ("auto", "nvml"):
        raise ValueError(f"unknown memory probe {kind!r}: expected auto, meminfo, nvml or none")
    probe = NvmlProbe(devices)
    absent = False
    try:
        probe.read_bytes()
    except ImportError as exc:
        absent, reason = True, f"nvidia-ml-py not installed ({exc})"
    except NoGpuError as exc:
        absent, reason = True, str(exc)
    except Exception as exc:
        if not _is_nvml_error(probe._nvml, exc):
            raise
        absent = getattr(exc, "value", None) in _nvml_absent_codes(probe._nvml)
        reason = _UNIFIED if _is_not_supported(probe._nvml, exc) else f"NVML unavailable: {exc}"
    else:
        return probe
    if kind == "nvml":
        raise ValueError(f"memory probe 'nvml' cannot be used here: {reason}")
    if absent:
        return MemInfoProbe()
    if reason == _UNIFIED:
        fallback = MemInfoProbe()
        fallback.name = f"meminfo ({reason})"
        return fallback
    return FixedProbe(free_gb=None, name=f"none ({reason})")


def _is_nvml_error(nvml: Any, exc: BaseException) -> bool:
    error_class = getattr(nvml, "NVMLError", None)
    return isinstance(error_class, type) and isinstance(exc, error_class)


def _nvml_absent_codes(nvml: Any) -> tuple[int, int]:
    """Library not found (no NVIDIA driver package) and driver not loaded: no usable NVIDIA GPU on this box."""
    return (getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12), getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9))


def _is_not_supported(nvml: Any, exc: BaseException) -> bool:
    """pynvml raises ``NVMLError(value)``, which ``__new__`` turns into the generated ``NVMLError_NotSupported``."""
    not_supported = getattr(nvml, "NVMLError_NotSupported", None)
    if isinstance(not_supported, type) and isinstance(exc, not_supported):
        return True
    return getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", _NVML_ERROR_NOT_SUPPORTED)
