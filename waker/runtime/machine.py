"""This machine's memory, read once at startup: its total and whether CPU and GPU share it.

The live probes in waker/runtime/memory.py answer "how much is free now?" on every admission; this answers "how much
is there at all?" for a node's budget (waker/config/machine.py decides what to do with the answer). The same
sources, by the same rules: NVML for discrete GPUs, ``/proc/meminfo`` where NVML reports no memory of its own
(unified memory, GB10) or sees no GPU.
"""

from pathlib import Path
from typing import Any

from waker.config.machine import MemoryReading
from waker.runtime.memory import GIB, _is_not_supported, _is_nvml_error, _nvml_absent_codes, meminfo_gb


def read_local_memory(nvml: Any = None, meminfo: str | Path = "/proc/meminfo") -> MemoryReading:
    """This machine's total memory and kind.

    ``nvml``: the ``pynvml`` module (nvidia-ml-py) or a stand-in; by default imported here, so a machine without it
    counts as one without a GPU. ``meminfo``: the file to read MemTotal from.

    * every GPU reports its memory: their sum (engines allocate from the cards, not from host RAM), not unified;
    * a GPU answers "Not Supported" (GB10 and other unified-memory parts): MemTotal, unified;
    * no nvidia-ml-py, no driver, or no GPU: MemTotal, not unified;
    * any other NVML failure (no permission, GPU lost): no total, so the caller falls back and warns. MemTotal would
      be a guess of the wrong memory on a box with discrete GPUs.
    """
    try:
        if nvml is None:
            import pynvml  # nvidia-ml-py: a dependency, but a broken install must not stop the gateway

            nvml = pynvml
        nvml.nvmlInit()
    except ImportError as exc:
        return _meminfo(meminfo, False, f"no GPU: nvidia-ml-py not installed ({exc})")
    except Exception as exc:
        if _is_nvml_error(nvml, exc) and getattr(exc, "value", None) in _nvml_absent_codes(nvml):
            return _meminfo(meminfo, False, "no GPU: no NVIDIA driver")
        if not _is_nvml_error(nvml, exc):
            raise
        return MemoryReading(None, None, f"NVML unavailable: {exc}")
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            return _meminfo(meminfo, False, "no GPU: NVML sees none")
        total = 0
        for index in range(count):
            total += int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).total)
    except Exception as exc:
        if not _is_nvml_error(nvml, exc):
            raise
        if _is_not_supported(nvml, exc):
            return _meminfo(meminfo, True, "unified memory")
        return MemoryReading(None, None, f"NVML unavailable: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()  # nvmlInit counts its callers: the live probe's own init is unaffected
        except Exception:  # a stand-in without it, or a driver that went away meanwhile: nothing to undo
            pass
    return MemoryReading(total / GIB, False, f"NVML: {count} GPU{'s' if count > 1 else ''}")


def _meminfo(path: str | Path, unified: bool, why: str) -> MemoryReading:
    try:
        total = meminfo_gb(Path(path).read_text(), "MemTotal")
    except OSError as exc:
        return MemoryReading(None, unified, f"{why}, and {path} unreadable: {exc.strerror}")
    if total is None:
        return MemoryReading(None, unified, f"{why}, and {path} has no MemTotal line")
    return MemoryReading(total, unified, f"/proc/meminfo MemTotal ({why})")


__all__ = ["read_local_memory"]
