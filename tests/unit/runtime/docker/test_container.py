"""The container configuration built from a models.d entry (no daemon needed)."""

from pathlib import Path

from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime.docker.container import LABEL_HASH, LABEL_MODEL, LABEL_PORT, container_config, container_name
from waker.runtime.docker.host import DockerNode

NODE = DockerNode()


def vllm(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": "gpt-oss-120b", "engine": "vllm", "runtime": "docker",
                                     "image": "vllm/vllm-openai:latest", "model": "openai/gpt-oss-120b", **fields})


def test_vllm_container_runs_the_adapter_command_on_the_container_port_published_on_loopback() -> None:
    spec = vllm(gpu_memory_utilization=0.55, args=["--max-model-len", "131072"])
    config = container_config(spec, engine_for("vllm"), NODE, 41000, "abc")
    assert config["entrypoint"] == ["vllm"]
    assert config["command"] == ["serve", "openai/gpt-oss-120b", "--host", "0.0.0.0", "--port", "8000",
                                 "--served-model-name", "gpt-oss-120b", "--gpu-memory-utilization", "0.55",
                                 "--shutdown-timeout", "15",
                                 "--max-model-len", "131072"]
    assert config["ports"] == {"8000/tcp": ("127.0.0.1", 41000)}
    assert config["restart_policy"] == {"Name": "no"}
    assert config["labels"][LABEL_MODEL] == "gpt-oss-120b"
    assert config["labels"][LABEL_HASH] == "abc"
    assert config["labels"][LABEL_PORT] == "41000"


def test_all_gpus_count_and_device_ids() -> None:
    engine = engine_for("vllm")
    every = container_config(vllm(gpus="all"), engine, NODE, 1, "h")["device_requests"][0]
    assert every["Count"] == -1 and every["Capabilities"] == [["gpu"]]
    two = container_config(vllm(gpus=2), engine, NODE, 1, "h")["device_requests"][0]
    assert two["Count"] == 2
    picked = container_config(vllm(gpus=["0", "3"]), engine, NODE, 1, "h")["device_requests"][0]
    assert picked["DeviceIDs"] == ["0", "3"]
    assert "device_requests" not in container_config(vllm(), engine, NODE, 1, "h")


def test_host_network_runs_the_engine_on_the_node_port_without_publishing() -> None:
    config = container_config(vllm(network="host", host="0.0.0.0"), engine_for("vllm"), NODE, 42000, "h")
    assert config["network_mode"] == "host"
    assert "ports" not in config
    assert config["command"][2:6] == ["--host", "0.0.0.0", "--port", "42000"]


def test_named_network_still_publishes_the_port() -> None:
    config = container_config(vllm(network="llm"), engine_for("vllm"), NODE, 42000, "h")
    assert config["network"] == "llm"
    assert config["ports"] == {"8000/tcp": ("127.0.0.1", 42000)}


def test_volumes_expand_home_and_shm_ipc_ulimits_memory_are_passed() -> None:
    spec = vllm(volumes=["~/.cache/huggingface:/root/.cache/huggingface", "/models:/models:ro"],
                shm_size="16g", ipc="host", ulimits={"memlock": -1, "stack": {"soft": 1, "hard": 2}},
                mem_limit="100g", init=True, env={"HF_HUB_OFFLINE": "1"})
    config = container_config(spec, engine_for("vllm"), NODE, 1, "h")
    assert config["volumes"] == [f"{Path.home()}/.cache/huggingface:/root/.cache/huggingface", "/models:/models:ro"]
    settings = (config["shm_size"], config["ipc_mode"], config["mem_limit"], config["init"])
    assert settings == ("16g", "host", "100g", True)
    assert [(u["Name"], u["Soft"], u["Hard"]) for u in config["ulimits"]] == [("memlock", -1, -1), ("stack", 1, 2)]
    assert config["environment"] == {"HF_HUB_OFFLINE": "1"}


def test_remote_node_publishes_where_the_gateway_can_reach() -> None:
    node = DockerNode("spark2", "ssh://me@spark2", address="10.0.0.2", publish_ip="0.0.0.0")
    config = container_config(vllm(), engine_for("vllm"), node, 43000, "h")
    assert config["ports"] == {"8000/tcp": ("0.0.0.0", 43000)}


def test_container_names_are_valid_docker_names() -> None:
    import re

    name = container_name("Qwen/Qwen3-Coder:30b@q4")
    assert name.startswith("sparkgate-Qwen-Qwen3-Coder-30b-q4-")
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name)
    # The suffix hashes the exact name and the gateway instance: names that read alike, and gateways, differ.
    alike = {container_name(m) for m in ("Qwen/Qwen3-4B", "Qwen:Qwen3-4B", "Qwen-Qwen3-4B")}
    assert len(alike) == 3
    assert container_name("m", "gw-a") != container_name("m", "gw-b")
    assert container_name("m", "gw-a") == container_name("m", "gw-a")


def test_bad_volume_is_rejected_at_load() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be host_path:/container/path"):
        vllm(volumes=["relative-only"])
