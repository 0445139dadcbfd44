"""Explicit ports that would meet are refused at load: two engines on one port of one machine and address (the
second could not bind, and the first would answer its readiness check and its requests), or an engine on the
gateway's own port. `sparkgate check` shows each, as it shows every invalid entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.config import load
from tests.harness import write_models as models
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError, load_dir

NODES = '{"local": {"total_gb": 128}, "spark2": {"docker_host": "ssh://me@spark2", "total_gb": 128}}'


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("DOCKER_HOST", "SPARKGATE_CONFIG_DIR", "SPARKGATE_PORT", "SPARKGATE_HOST"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SPARKGATE_NODES", NODES)
    monkeypatch.setenv("SPARKGATE_STATS_DB", str(tmp_path / "stats.sqlite3"))  # never the user's own


def process(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "llamacpp", "model": f"/models/{name}.gguf", "memory_gb": 4, **fields}


def docker(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "runtime": "docker", "image": "vllm/vllm-openai", "model": f"org/{name}",
            "memory_gb": 20, **fields}


def check(capsys: pytest.CaptureFixture[str], directory: Path, *flags: str) -> tuple[int, str]:
    code = cli.main(["check", "--config-dir", str(directory), *flags])
    return code, capsys.readouterr().err


def test_check_refuses_two_process_engines_on_one_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = models(tmp_path / "m", process("a", port=9100), process("b", port=9100))
    code, err = check(capsys, directory)
    assert code == 2
    assert f"{directory / 'b.yaml'}: port: 9100 on 127.0.0.1 is already taken by model 'a' " \
           f"({directory / 'a.yaml'})" in err


@pytest.mark.parametrize(("first", "second", "meet"), [
    ("127.0.0.1", "127.0.0.1", True),
    ("0.0.0.0", "127.0.0.1", True),  # a wildcard takes the port on every address
    ("192.168.1.5", "::", True),
    ("localhost", "127.0.0.1", True),
    ("127.0.0.1", "192.168.1.5", False),  # two addresses of one machine: two ports
])
def test_process_engines_meet_on_one_address_or_a_wildcard(tmp_path: Path, first: str, second: str,
                                                          meet: bool) -> None:
    directory = models(tmp_path, process("a", host=first, port=9100), process("b", host=second, port=9100))
    if meet:
        with pytest.raises(ConfigError, match="port: 9100"):
            load_dir(directory)
    else:
        assert set(load_dir(directory)) == {"a", "b"}


def test_engines_without_a_port_or_on_different_ports_never_meet(tmp_path: Path) -> None:
    directory = models(tmp_path, process("a"), process("b"), process("c", port=9100), process("d", port=9101))
    assert len(load_dir(directory)) == 4


@pytest.mark.parametrize(("first", "second", "meet"), [
    ({"node": "local"}, {"node": "local"}, True),
    ({"node": "local"}, {"node": "spark2"}, False),
    ({}, {"node": "spark2"}, True),  # any node: it may land on spark2
    ({"node": ["local", "spark2"]}, {"node": "spark2"}, True),
    ({"node": "local", "network": "host", "host": "127.0.0.1"}, {"node": "local", "network": "host",
                                                                  "host": "10.0.0.1"}, False),
])
def test_containers_meet_on_one_node_and_published_port(tmp_path: Path, first: dict[str, Any],
                                                        second: dict[str, Any], meet: bool) -> None:
    directory = models(tmp_path, docker("a", port=9200, **first), docker("b", port=9200, **second))
    if meet:
        with pytest.raises(ConfigError, match="already taken by model 'a'"):
            load_dir(directory)
    else:
        assert len(load_dir(directory)) == 2


def test_a_container_on_this_machine_meets_a_process_engine(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    nodes = {"local": NodeConfig(total_gb=128),
             "spark2": NodeConfig(docker_host="ssh://me@spark2", total_gb=128)}
    here = models(tmp_path / "here", docker("c", node="local", port=9300), process("p", port=9300))
    with pytest.raises(ConfigError, match="already taken by model 'c'"):
        load(here, None, nodes)
    assert check(capsys, here)[0] == 2
    away = models(tmp_path / "away", docker("c", node="spark2", port=9300), process("p", port=9300))
    assert len(load(away, None, nodes).registry) == 2


def test_check_refuses_an_engine_on_the_gateways_own_port(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = check(capsys, models(tmp_path / "default", process("a", port=8009)))  # the gateway's default port
    assert code == 2 and "port: 8009 on 127.0.0.1 is already taken by the gateway itself (127.0.0.1:8009)" in err
    monkeypatch.setenv("SPARKGATE_PORT", "9400")
    code, err = check(capsys, models(tmp_path / "env", docker("d", port=9400)))  # any node: maybe this machine
    assert code == 2 and "already taken by the gateway itself (127.0.0.1:9400)" in err
    assert check(capsys, models(tmp_path / "elsewhere", docker("d", node="spark2", port=9400)))[0] == 0
    assert check(capsys, models(tmp_path / "other", process("a", port=8010)))[0] == 0
