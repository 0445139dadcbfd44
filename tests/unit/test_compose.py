"""Nodes in the gateway settings: labels, the inter-node address, and which memory probe each node gets."""

import json
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings
from waker import compose
from waker.runtime.docker.memory_probe import DockerMemoryProbe
from waker.runtime.memory import FixedProbe, MemInfoProbe


@pytest.fixture(autouse=True)
def no_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("SPARKGATE_NODES", raising=False)


def from_env(monkeypatch: pytest.MonkeyPatch, nodes: dict[str, Any]) -> GatewaySettings:
    monkeypatch.setenv("SPARKGATE_NODES", json.dumps(nodes))
    return GatewaySettings()


def test_labels_and_cluster_address_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, {
        "spark1": {"labels": {"gpu": "gb10", "link": "qsfp"}, "cluster_address": "192.168.100.1"},
        "spark2": {"docker_host": "ssh://me@spark2", "address": "10.0.0.2", "labels": {"gpu": "gb10"}},
    })
    assert compose.labels(settings.nodes) == {"spark1": {"gpu": "gb10", "link": "qsfp"}, "spark2": {"gpu": "gb10"}}
    assert settings.nodes["spark1"].cluster_address == "192.168.100.1"
    assert settings.nodes["spark2"].cluster_address is None


def test_nodes_without_labels_have_empty_ones() -> None:
    assert compose.labels(GatewaySettings().nodes) == {"local": {}}


def test_docker_nodes_get_the_cluster_address_defaulting_to_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, {
        "spark1": {"address": "10.0.0.1", "cluster_address": "192.168.100.1"},
        "spark2": {"docker_host": "tcp://10.0.0.2:2375", "address": "10.0.0.2", "publish_ip": "0.0.0.0"},
    })
    nodes = compose.docker_nodes(settings.nodes)
    assert (nodes["spark2"].name, nodes["spark2"].url, nodes["spark2"].address, nodes["spark2"].publish_ip) == \
        ("spark2", "tcp://10.0.0.2:2375", "10.0.0.2", "0.0.0.0")
    assert nodes["spark1"].link_address == "192.168.100.1"
    assert nodes["spark2"].link_address == "10.0.0.2"  # no link of its own: the address


def test_labels_must_be_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="labels"):
        from_env(monkeypatch, {"spark1": {"labels": {"gpu": ["gb10"]}}})


@pytest.mark.parametrize("docker_host", [None, "unix:///var/run/docker.sock"])
def test_auto_reads_this_machine_for_a_local_docker_host(monkeypatch: pytest.MonkeyPatch,
                                                         docker_host: str | None) -> None:
    settings = from_env(monkeypatch, {"box": {"docker_host": docker_host}})
    assert settings.nodes["box"].probe_kind() == "auto"
    # NVML or /proc/meminfo, as make_probe picks
    assert not isinstance(compose.probes(settings.nodes)["box"], DockerMemoryProbe)


@pytest.mark.parametrize("docker_host", ["tcp://10.0.0.2:2375", "ssh://me@spark2", "https://spark2:2376"])
def test_auto_reads_a_remote_node_through_its_docker(monkeypatch: pytest.MonkeyPatch, docker_host: str) -> None:
    settings = from_env(monkeypatch, {"local": {"memory_probe": "meminfo"}, "spark2": {"docker_host": docker_host}})
    probes = compose.probes(settings.nodes)
    assert isinstance(probes["local"], MemInfoProbe)
    probe = probes["spark2"]
    assert isinstance(probe, DockerMemoryProbe)
    assert probe.name == f"docker ({docker_host})"
    assert probe.node == "spark2"
    assert probe._thread is None  # building settings starts nothing


def test_auto_follows_docker_host_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "ssh://me@spark2")
    probe = compose.probes(from_env(monkeypatch, {"spark2": {}}).nodes)["spark2"]
    assert isinstance(probe, DockerMemoryProbe)
    assert probe.name == "docker (ssh://me@spark2)"


def test_docker_probe_can_be_forced_for_a_local_socket_with_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, {"box": {"docker_host": "unix:///run/other.sock", "memory_probe": "docker",
                                              "memory_probe_interval": "2s"}})
    probe = compose.probes(settings.nodes)["box"]
    assert isinstance(probe, DockerMemoryProbe)
    assert (probe.interval, probe.max_age) == (2.0, 6.0)


def test_none_turns_the_probe_off_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, {"local": {"memory_probe": "none"},
                                      "spark2": {"docker_host": "ssh://me@spark2", "memory_probe": "none"}})
    for probe in compose.probes(settings.nodes).values():
        assert isinstance(probe, FixedProbe)
        assert probe.free_gb() is None


def test_this_machines_probe_named_for_a_remote_node_leaves_it_to_the_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc/meminfo here says nothing about spark2; such a setting was ignored before, and still is (loudly named).
    settings = from_env(monkeypatch, {"spark2": {"docker_host": "ssh://me@spark2", "memory_probe": "meminfo"}})
    probe = compose.probes(settings.nodes)["spark2"]
    assert isinstance(probe, FixedProbe)
    assert probe.free_gb() is None
    assert probe.name == "none (meminfo reads this machine, not 'spark2')"


def test_unknown_probe_kind_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="memory_probe"):
        from_env(monkeypatch, {"local": {"memory_probe": "cuda"}})


def test_default_settings_keep_one_local_node() -> None:
    settings = GatewaySettings()
    assert list(compose.docker_nodes(settings.nodes)) == ["local"]
    assert compose.docker_nodes(settings.nodes)["local"].url is None
    assert not isinstance(compose.probes(settings.nodes)["local"], DockerMemoryProbe)
