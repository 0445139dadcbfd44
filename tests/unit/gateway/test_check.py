"""models.d loaded against the nodes' memory: `sparkgate check` shows each node's total and where it came from, the
fractions derived, the sleeping footprints and the warnings; vLLM's sleep level 1 on unified memory is refused; a
running gateway's status shows the totals too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.admin import node_state
from gateway.client import status_table
from gateway.config import load, load_models
from tests.harness import write_models as models
from waker import compose
from waker.config.machine import MemoryReading, resolve_nodes
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError
from waker.status import NodeStatus

SPARK = '{"local": {"total_gb": 128, "unified_memory": true}}'
UNIFIED = MemoryReading(119.7, True, "/proc/meminfo MemTotal (unified memory)")
SMALL_BOX = MemoryReading(23.4, False, "/proc/meminfo MemTotal (no GPU: no NVIDIA driver)")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("SPARKGATE_NODES", "DOCKER_HOST", "SPARKGATE_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SPARKGATE_STATS_DB", str(tmp_path / "stats.sqlite3"))  # never the user's own


def vllm(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "runtime": "docker", "image": "vllm/vllm-openai", "model": f"org/{name}",
            **fields}


def machine(reading: MemoryReading, **nodes: NodeConfig) -> dict[str, NodeConfig]:
    return resolve_nodes(nodes or {"local": NodeConfig()}, local=lambda: reading,
                         remote=lambda url: MemoryReading(128.0, None, f"Docker info of {url}"))


def check(capsys: pytest.CaptureFixture[str], directory: Path) -> tuple[int, str, str]:
    code = cli.main(["check", "--config-dir", str(directory)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_shows_the_node_the_derived_fraction_and_the_sleeping_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    directory = models(tmp_path / "m", vllm("chat", memory_gb=40, idle_action="sleep"))
    code, out, _ = check(capsys, directory)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "TOTAL", "RESERVE", "BUDGET", "MEMORY", "TOTAL", "FROM"]
    assert lines[1].split() == ["local", "128.0", "GB", "8", "GB", "120.0", "GB", "unified", "configured"]
    row = next(line for line in lines if line.startswith("chat "))
    assert "0.31 (derived)" in row and "4 GB" in row  # the fraction and the sleeping footprint
    assert "chat: gpu_memory_utilization 0.31 (derived from memory_gb 40 of 128 GB)" in lines
    assert "chat: asleep 4 GB (default for sleep_level 2: min(4, memory_gb); learned once the stats have seen it " \
           "asleep)" in lines


def test_check_reads_the_total_from_this_machine_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose, "read_local_memory", lambda: SMALL_BOX)
    directory = models(tmp_path / "m", vllm("small", memory_gb=6))
    code, out, _ = check(capsys, directory)
    assert code == 0, out
    assert out.splitlines()[1].split() == ["local", "23.4", "GB", "8", "GB", "15.4", "GB", "separate",
                                           "/proc/meminfo", "MemTotal", "(no", "GPU:", "no", "NVIDIA", "driver)"]
    assert "small: gpu_memory_utilization 0.25 (derived from memory_gb 6 of 23.4 GB)" in out.splitlines()


def test_check_refuses_a_model_too_big_for_this_machine_and_shows_where_the_total_came_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose, "read_local_memory", lambda: SMALL_BOX)
    code, _, err = check(capsys, models(tmp_path / "m", vllm("big", memory_gb=70)))
    assert code == 2
    assert "/proc/meminfo MemTotal (no GPU" in err and "big needs 70 GB but node 'local' has a budget of 15.4" in err


def test_check_warns_where_a_given_fraction_and_memory_gb_disagree(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    directory = models(tmp_path / "m", vllm("greedy", memory_gb=40, gpu_memory_utilization=0.9),
                       {"name": "trt", "engine": "trtllm", "model": "meta-llama/Llama-3.1-8B", "memory_gb": 30})
    code, out, _ = check(capsys, directory)
    assert code == 0
    assert ("greedy: warning: gpu_memory_utilization 0.9 gives vllm about 115.2 GB (0.9 of 128 GB) but memory_gb is "
            "40: more than the budget counts for it") in out.splitlines()
    assert "trt: warning: the weights' size is unknown ('meta-llama/Llama-3.1-8B' is not a path readable here)" in out
    assert "trt: gpu_memory_utilization 0.23" in out


def test_vllm_sleep_level_1_on_unified_memory_is_refused_unless_opted_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    directory = models(tmp_path / "m", vllm("warm", memory_gb=30, idle_action="sleep", sleep_level=1))
    code, out, err = check(capsys, directory)
    assert code == 2 and out == ""
    assert "warm.yaml: sleep_level: 1 is refused for vllm on unified memory (node 'local')" in err
    assert "sleep_level_1_on_unified_memory: true" in err
    models(directory, vllm("warm", memory_gb=30, idle_action="sleep", sleep_level=1,
                           sleep_level_1_on_unified_memory=True))
    code, out, _ = check(capsys, directory)
    assert code == 0
    assert "warm: asleep 30 GB (default for sleep_level 1: memory_gb, since the weights stay in host RAM" in out


def test_the_refusal_follows_the_nodes_the_model_may_run_on(tmp_path: Path) -> None:
    nodes = machine(UNIFIED, spark=NodeConfig(), box=NodeConfig(docker_host="ssh://me@box", labels={"gpu": "h100"}))
    directory = models(tmp_path, vllm("warm", memory_gb=30, idle_action="sleep", sleep_level=1,
                                      node_labels={"gpu": "h100"}))
    assert load(directory, None, nodes).registry["warm"].sleep_level == 1  # only the remote node: not known unified
    models(directory, vllm("warm", memory_gb=30, idle_action="sleep", sleep_level=1))  # may run on the Spark too
    with pytest.raises(ConfigError, match="node 'spark'"):
        load(directory, None, nodes)


def test_a_process_is_refused_when_this_machine_has_unified_memory(tmp_path: Path) -> None:
    entry = {"name": "p", "engine": "vllm", "model": "org/p", "memory_gb": 20, "idle_action": "sleep",
             "sleep_level": 1}
    with pytest.raises(ConfigError, match="sleep_level: 1 is refused"):
        load(models(tmp_path, entry), None, machine(UNIFIED))
    assert load(tmp_path, None, machine(SMALL_BOX)).registry["p"].sleep_level == 1


def test_several_nodes_use_the_largest_total(tmp_path: Path) -> None:
    nodes = machine(SMALL_BOX, local=NodeConfig(), spark=NodeConfig(docker_host="ssh://me@spark"))
    loaded = load(models(tmp_path, vllm("m", memory_gb=12)), None, nodes)
    assert loaded.registry["m"].gpu_memory_utilization == 0.09  # 12 / 128, not 12 / 23.4
    assert loaded.nodes["spark"].total_source == "Docker info of ssh://me@spark"


def test_load_models_logs_the_warnings_and_keeps_the_nodes_it_is_given(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = models(tmp_path, vllm("greedy", memory_gb=40, gpu_memory_utilization=0.9))
    with caplog.at_level(logging.WARNING, logger="sparkgate.config"):
        registry = load_models(directory, None, machine(UNIFIED))
    assert registry["greedy"].gpu_memory_utilization == 0.9
    assert "greedy: gpu_memory_utilization 0.9 gives vllm about 107.7 GB (0.9 of 119.7 GB)" in caplog.text


def test_status_shows_each_nodes_total_and_its_source() -> None:
    node = machine(SMALL_BOX)["local"]
    described = NodeStatus(name="local", capacity_gb=15.4, total_gb=23.4, reserve_gb=8, held_gb=0.2, queued=0,
                           live_free_gb=22.9, probe="meminfo", high_water_gb=0.2, labels={})
    state = {"models": [], "nodes": {"local": node_state(described, node)}}
    assert state["nodes"]["local"]["total_source"] == SMALL_BOX.source
    assert state["nodes"]["local"]["unified_memory"] is False
    assert status_table(state).splitlines()[-1] == (
        "node local: 0.2/15.4 GB held, 22.9 GB free on the machine, 0 queued, 23.4 GB total (/proc/meminfo MemTotal "
        "(no GPU: no NVIDIA driver))")
