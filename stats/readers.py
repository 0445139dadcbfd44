"""Memory readers: what one engine really takes, read from the kernel and NVML (a container's cgroup is read by the
Docker runtime: ``waker.runtime.docker.container.container_memory``, behind the ``ContainerEngine`` protocol).

Each reader is a plain blocking function (procfs reads, NVML calls): the sampler runs them off the event loop. They
return bytes, and None where a figure can't be had, so a missing source never looks like "uses nothing".

Why these sources:

* Process runtime: an engine is a process *group* (``start_new_session=True``; vLLM and SGLang spawn workers that
  inherit it), so its memory is the sum over every process whose pgid is the engine's pid. PSS (proportional set
  size, ``/proc/<pid>/smaps_rollup``) splits shared pages between the processes that map them, so summing it over a
  group counts shared libraries and shared-memory segments once; summing RSS counts them in every worker. RSS is
  also returned: it is all that ``/proc/<pid>/status`` offers where ``smaps_rollup`` is missing (kernels before 4.14)
  or unreadable (a process of another user).
* Docker runtime: the container's memory cgroup, which also counts the page cache its processes fill, minus the
  reclaimable (inactive) file cache, the same rule as ``docker stats`` (read by the runtime, see above).
* NVML per-process GPU memory: on discrete GPUs the weights and KV cache live in the card's own memory, which no
  procfs or cgroup figure shows.
* ``MemAvailable``: the whole machine, to see the pool shrink as engines load (see waker/runtime/memory.py for why
  MemAvailable and not MemFree).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

_KIB = 1024  # procfs says "kB" and means KiB


# -- processes -------------------------------------------------------------------------------------------------------


def process_groups(pgids: Collection[int], proc: Path = Path("/proc")) -> dict[int, list[int]]:
    """The pids in each of ``pgids`` (only groups that have a live process appear), from one scan of ``/proc``.

    One scan serves every engine of a sampling round: ``/proc`` may hold thousands of processes, and reading each
    one's ``stat`` once per round is cheaper than once per engine.
    """
    wanted = set(pgids)
    members: dict[int, list[int]] = {}
    if not wanted:
        return members
    try:
        entries = os.listdir(proc)
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        pgid = _pgid_of(proc / entry / "stat")
        if pgid in wanted:
            members.setdefault(pgid, []).append(int(entry))
    return members


def _pgid_of(stat: Path) -> int | None:
    try:
        text = stat.read_text()
    except OSError:  # gone since the listing, or not ours to read
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ")": split after the last one.
    # Then come state, ppid, pgrp.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[2])
    except (IndexError, ValueError):
        return None


def process_memory(pid: int, proc: Path = Path("/proc")) -> tuple[int, int | None] | None:
    """(rss, pss) of one process in bytes; pss is None where only ``/proc/<pid>/status`` could be read; None when the
    process is gone (or is a zombie, which holds no memory)."""
    rollup = _kib_fields(proc / str(pid) / "smaps_rollup", ("Rss", "Pss"))
    if rollup is not None and "Rss" in rollup:
        return rollup["Rss"], rollup.get("Pss")
    status = _kib_fields(proc / str(pid) / "status", ("VmRSS",))
    if status is None or "VmRSS" not in status:
        return None
    return status["VmRSS"], None


def _kib_fields(path: Path, keys: Iterable[str]) -> dict[str, int] | None:
    try:
        text = path.read_text()
    except OSError:  # missing (old kernel, process gone) or not permitted (another user's process)
        return None
    wanted = set(keys)
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            parts = rest.split()
            if parts and parts[0].isdigit():
                found[key] = int(parts[0]) * _KIB
    return found


def sum_memory(pids: Iterable[int], proc: Path = Path("/proc")) -> tuple[int, int | None] | None:
    """(rss, pss) summed over ``pids``; pss is None unless every live process had one (a partial PSS sum would
    understate the group); None when none of them is alive."""
    rss = pss = 0
    pss_known = True
    alive = False
    for pid in pids:
        reading = process_memory(pid, proc)
        if reading is None:
            continue
        alive = True
        rss += reading[0]
        if reading[1] is None:
            pss_known = False
        else:
            pss += reading[1]
    if not alive:
        return None
    return rss, pss if pss_known else None


def process_group_memory(pgid: int, proc: Path = Path("/proc")) -> tuple[int, int | None] | None:
    """(rss, pss) in bytes summed over every process of group ``pgid`` (an engine's pid is its group's id).

    None when the group has no live process (the engine exited between the state check and this read); pss is None
    when a member's ``smaps_rollup`` could not be read (then rss is the only figure for the whole group).
    """
    return sum_memory(process_groups([pgid], proc).get(pgid, []), proc)


def system_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` in bytes: what the kernel could hand out now without swapping; None where it is missing."""
    fields = _kib_fields(meminfo, ("MemAvailable",))
    return fields.get("MemAvailable") if fields else None


# -- GPUs ------------------------------------------------------------------------------------------------------------


def open_nvml(nvml: Any = None) -> Any | None:
    """pynvml (package nvidia-ml-py), initialised; None where there is no NVML (not installed, no driver, no GPU).

    The sampler calls this once: a box without NVIDIA GPUs then simply records no GPU figures.
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return None
        nvml = pynvml
    try:
        nvml.nvmlInit()
        if int(nvml.nvmlDeviceGetCount()) == 0:
            return None
    except Exception as exc:
        if _is_nvml_error(nvml, exc):
            return None
        raise
    return nvml


def gpu_memory_by_pid(nvml: Any) -> dict[int, int] | None:
    """Device memory used by each compute process, in bytes summed over every GPU; None when no GPU can tell.

    A GPU answers None (skipped) where the query itself is NOT_SUPPORTED, or where NVML lists the process but cannot
    say its memory (pynvml turns NVML_VALUE_NOT_AVAILABLE into ``usedGpuMemory = None``). On a unified-memory GB10
    the device-wide ``nvmlDeviceGetMemoryInfo`` answers NOT_SUPPORTED; this per-process query is handled the same
    way if it does too, so the sampler records "unknown" rather than 0 there.
    """
    if nvml is None:
        return None
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        if _is_nvml_error(nvml, exc):
            return None
        raise
    used: dict[int, int] = {}
    answered = False
    for index in range(count):
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(index))
        except Exception as exc:
            if _is_nvml_error(nvml, exc):
                continue  # NOT_SUPPORTED (unified memory), GPU lost, no permission: this GPU can't tell
            raise
        for process in processes:
            memory = getattr(process, "usedGpuMemory", None)
            if memory is None:
                continue
            answered = True
            used[int(process.pid)] = used.get(int(process.pid), 0) + int(memory)
        if not processes:
            answered = True  # a GPU that answers with no process says "nothing here", which is a figure: 0
    return used if answered else None


def gpu_process_memory(nvml: Any, pids: Collection[int]) -> int | None:
    """Device memory in bytes used by ``pids`` on every GPU; None when NVML is absent or can't tell (see
    :func:`gpu_memory_by_pid`). A process that holds no GPU memory counts 0."""
    used = gpu_memory_by_pid(nvml)
    if used is None:
        return None
    return sum(used.get(pid, 0) for pid in set(pids))


def _is_nvml_error(nvml: Any, exc: BaseException) -> bool:
    error_class = getattr(nvml, "NVMLError", None)
    return isinstance(error_class, type) and isinstance(exc, error_class)

