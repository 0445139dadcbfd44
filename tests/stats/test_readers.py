"""The readers against real processes, fixture procfs trees and a stand-in NVML."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from stats.readers import (
    gpu_memory_by_pid,
    gpu_process_memory,
    open_nvml,
    process_group_memory,
    process_groups,
    process_memory,
    system_available,
)
from tests.stats.conftest import MIB, NVML_ERROR_NOT_SUPPORTED, FakeNvml, Hog
from waker.runtime.docker.container import memory_from_stats

GIB = 1024**3


def test_a_process_group_of_one_holding_200_mib(memory_hog: Callable[..., Hog]) -> None:
    hog = memory_hog(200)
    reading = process_group_memory(hog.pid)
    assert reading is not None
    rss, pss = reading
    assert rss >= 190 * MIB
    assert pss is not None and pss >= 190 * MIB  # our own process: smaps_rollup is readable
    assert pss <= rss


def test_the_group_sums_every_process_in_it(memory_hog: Callable[..., Hog]) -> None:
    """An engine's workers are in its process group: their memory is the engine's."""
    hog = memory_hog(100, children=2)
    members = process_groups([hog.pid])[hog.pid]
    assert len(members) == 3 and hog.pid in members
    for pid in members:  # no single process holds the total ...
        single = process_memory(pid)
        assert single is not None and single[0] < 190 * MIB
    rss, pss = process_group_memory(hog.pid) or (0, None)
    assert rss >= 290 * MIB  # ... the group does
    assert pss is not None and pss >= 290 * MIB


def test_a_group_with_no_process_left_reads_none(memory_hog: Callable[..., Hog]) -> None:
    hog = memory_hog(1)
    hog.kill()
    assert process_group_memory(hog.pid) is None
    assert process_groups([hog.pid]) == {}
    assert process_groups([]) == {}


def _fake_proc(root: Path, pid: int, comm: str, pgrp: int, rollup: str | None, status: str) -> None:
    folder = root / str(pid)
    folder.mkdir()
    (folder / "stat").write_text(f"{pid} ({comm}) S 1 {pgrp} {pgrp} 0 -1 4194560 0 0 0\n")
    if rollup is not None:
        (folder / "smaps_rollup").write_text(rollup)
    (folder / "status").write_text(status)


def test_procfs_parsing_odd_names_and_the_status_fallback(tmp_path: Path) -> None:
    """A command name may hold spaces and ")"; without smaps_rollup (kernel < 4.14, another user's process) only
    VmRSS is known, so the group has no PSS rather than a partial one."""
    rollup = "00400000-7fff [rollup]\nRss:   2048 kB\nPss:   1024 kB\nPss_Anon:  512 kB\n"
    _fake_proc(tmp_path, 10, "vllm) (worker 1", 10, rollup, "Name: x\nVmRSS:  9999 kB\n")
    _fake_proc(tmp_path, 11, "worker", 10, None, "Name: y\nVmRSS:  4096 kB\n")
    _fake_proc(tmp_path, 12, "other", 12, rollup, "")
    (tmp_path / "self").mkdir()
    assert {g: sorted(pids) for g, pids in process_groups([10, 99], tmp_path).items()} == {10: [10, 11]}
    assert process_memory(10, tmp_path) == (2048 * 1024, 1024 * 1024)
    assert process_memory(11, tmp_path) == (4096 * 1024, None)
    assert process_group_memory(10, tmp_path) == (6144 * 1024, None)
    assert process_group_memory(12, tmp_path) == (2048 * 1024, 1024 * 1024)


def test_system_available_is_memavailable(tmp_path: Path) -> None:
    real = system_available()
    assert real is not None and real > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  131072000 kB\nMemFree:  1000 kB\nMemAvailable:  65536000 kB\n")
    assert system_available(meminfo) == 65536000 * 1024
    meminfo.write_text("MemTotal:  131072000 kB\n")  # kernels before 3.14
    assert system_available(meminfo) is None
    assert system_available(tmp_path / "missing") is None


def test_docker_memory_stats_without_reclaimable_cache() -> None:
    """The rule the Docker runtime reads a container's cgroup with (pure: no daemon)."""
    v1 = {"usage": 116_625_408, "stats": {"total_inactive_file": 7_929_856, "cache": 7_938_048,
                                          "inactive_file": 7_929_856, "rss": 107_585_536}}
    assert memory_from_stats(v1) == 116_625_408 - 7_929_856
    v2 = {"usage": 500, "stats": {"inactive_file": 120, "active_file": 80, "anon": 300}}
    assert memory_from_stats(v2) == 380
    before_19_03 = {"usage": 500, "stats": {"cache": 200}}
    assert memory_from_stats(before_19_03) == 300
    assert memory_from_stats({"usage": 500}) == 500
    assert memory_from_stats({"usage": 100, "stats": {"inactive_file": 400}}) == 100  # never below zero
    assert memory_from_stats({}) is None  # not running


def test_gpu_readings_sum_the_processes_asked_for() -> None:
    nvml = FakeNvml(devices=[[(100, 8 * GIB), (200, 1 * GIB)], [(100, 2 * GIB), (300, 5 * GIB)]])
    assert gpu_process_memory(nvml, [100]) == 10 * GIB  # both GPUs
    assert gpu_process_memory(nvml, {100, 200}) == 11 * GIB
    assert gpu_process_memory(nvml, [400]) == 0  # on no GPU: holds none
    assert gpu_memory_by_pid(nvml) == {100: 10 * GIB, 200: 1 * GIB, 300: 5 * GIB}


def test_gpu_not_supported_reads_none_not_zero() -> None:
    """GB10 (unified memory) answers NOT_SUPPORTED: "unknown", which must never look like "uses nothing"."""
    assert gpu_process_memory(FakeNvml(devices=[NVML_ERROR_NOT_SUPPORTED]), [100]) is None
    assert gpu_process_memory(FakeNvml(devices=[[(100, None)]]), [100]) is None  # listed, memory not available
    assert gpu_process_memory(None, [100]) is None  # no NVML at all
    # One GPU that can't tell and one that can: the one that can is the figure.
    mixed = FakeNvml(devices=[NVML_ERROR_NOT_SUPPORTED, [(100, 3 * GIB)]])
    assert gpu_process_memory(mixed, [100]) == 3 * GIB
    assert gpu_process_memory(FakeNvml(devices=[[]]), [100]) == 0  # a GPU with no process on it


def test_open_nvml_gives_none_where_there_is_no_gpu() -> None:
    assert open_nvml(FakeNvml(devices=[])) is None
    assert open_nvml(FakeNvml(devices=[[]], init_error=9)) is None  # driver not loaded
    nvml = FakeNvml(devices=[[]])
    assert open_nvml(nvml) is nvml and nvml.initialised == 1
    with pytest.raises(ZeroDivisionError):  # only NVML's own errors mean "no NVML"; bugs still surface
        open_nvml(type("Broken", (FakeNvml,), {"nvmlInit": lambda self: 1 / 0})())


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="kernel without smaps_rollup")
def test_this_process_reads_itself() -> None:
    rss, pss = process_memory(os.getpid()) or (0, None)
    assert rss > 0 and pss is not None and 0 < pss <= rss
