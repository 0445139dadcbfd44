"""The parts of a model spanning two nodes: exact commands, environment and up checks (no daemon needed)."""

import pytest

from waker.config.spec import ModelSpec
from waker.engines.multinode import UpCheck, plan_group
from waker.engines.registry import engine_for
from waker.runtime.base import Exit
from waker.runtime.docker.container import LABEL_GROUP_SIZE, LABEL_NODE, LABEL_PART
from waker.runtime.docker.group import part_config, part_container_name
from waker.runtime.docker.host import DockerNode

SPARK_A = DockerNode(name="spark-a", url="ssh://a", address="10.0.0.1", cluster_address="192.168.100.10")
SPARK_B = DockerNode(name="spark-b", url="ssh://b", address="10.0.0.2", cluster_address="192.168.100.11")


def spec(engine: str, **fields: object) -> ModelSpec:
    base = {"name": "big", "engine": engine, "runtime": "docker", "image": "img:1", "model": "org/big",
            "nodes": 2, "network": "host", "gpu_memory_utilization": 0.8, "env": {"HF_HUB_OFFLINE": "1"},
            "multinode": {"ray_port": 6380, "dist_port": 20001, "interface": "enp1s0f1np1",
                          "head_env": {"ONLY_HEAD": "1"}, "worker_env": {"ONLY_WORKER": "1"}}}
    return ModelSpec.model_validate({**base, **fields})


LINK = {"NCCL_SOCKET_IFNAME": "enp1s0f1np1", "GLOO_SOCKET_IFNAME": "enp1s0f1np1",
        "TP_SOCKET_IFNAME": "enp1s0f1np1", "UCX_NET_DEVICES": "enp1s0f1np1"}
RAY = {"RAY_memory_monitor_refresh_ms": "0"}  # the playbook's setting: Ray's memory monitor off on unified memory


def test_vllm_over_two_nodes_is_a_ray_head_a_ray_worker_and_vllm_serve_with_pipeline_stages() -> None:
    plan = plan_group(spec("vllm", args=["--max-model-len", "8192"]), engine_for("vllm"), [SPARK_A, SPARK_B], 8000)
    head, worker = plan.parts
    assert (head.role, head.node) == ("head", "spark-a")
    assert head.argv == ("ray", "start", "--head", "--port", "6380", "--node-ip-address", "192.168.100.10", "--block")
    assert dict(head.env) == {"VLLM_HOST_IP": "192.168.100.10", **RAY, **LINK, "HF_HUB_OFFLINE": "1", "ONLY_HEAD": "1"}
    assert head.up == UpCheck(log="Ray runtime started")
    assert (worker.role, worker.node) == ("worker-1", "spark-b")
    assert worker.argv == ("ray", "start", "--address", "192.168.100.10:6380", "--node-ip-address",
                           "192.168.100.11", "--block")
    assert dict(worker.env) == {"VLLM_HOST_IP": "192.168.100.11", **RAY, **LINK, "HF_HUB_OFFLINE": "1",
                                "ONLY_WORKER": "1"}
    assert worker.up == head.up
    assert plan.serve == ("vllm", "serve", "org/big", "--host", "127.0.0.1", "--port", "8000", "--served-model-name",
                          "big", "--gpu-memory-utilization", "0.8", "--shutdown-timeout", "15",
                          "--distributed-executor-backend", "ray",
                          "--pipeline-parallel-size", "2", "--max-model-len", "8192")


def test_vllm_tensor_split_and_user_flags_win() -> None:
    tensor = spec("vllm", multinode={"parallel": "tensor"}, args=["--distributed-executor-backend=ray"])
    plan = plan_group(tensor, engine_for("vllm"), [SPARK_A, SPARK_B], 9000)
    assert plan.serve is not None
    assert plan.serve[-3:] == ("--tensor-parallel-size", "2", "--distributed-executor-backend=ray")
    assert "--pipeline-parallel-size" not in plan.serve
    assert plan.serve.count("--distributed-executor-backend=ray") == 1


def test_sglang_over_two_nodes_is_one_launch_server_per_rank_meeting_at_rank_0() -> None:
    plan = plan_group(spec("sglang"), engine_for("sglang"), [SPARK_A, SPARK_B], 30000)
    rank0, rank1 = plan.parts
    assert plan.serve is None
    common = ("--nnodes", "2")
    assert rank0.argv == ("python3", "-m", "sglang.launch_server", "--model-path", "org/big", "--host", "127.0.0.1",
                          "--port", "30000", "--served-model-name", "big", "--mem-fraction-static", "0.8", *common,
                          "--node-rank", "0", "--dist-init-addr", "192.168.100.10:20001", "--pp-size", "2")
    assert rank1.argv == ("python3", "-m", "sglang.launch_server", "--model-path", "org/big", "--host", "127.0.0.1",
                          "--port", "30001", "--served-model-name", "big", "--mem-fraction-static", "0.8", *common,
                          "--node-rank", "1", "--dist-init-addr", "192.168.100.10:20001", "--pp-size", "2")
    assert dict(rank0.env) == {**LINK, "HF_HUB_OFFLINE": "1", "ONLY_HEAD": "1"}
    assert dict(rank1.env) == {**LINK, "HF_HUB_OFFLINE": "1", "ONLY_WORKER": "1"}
    assert rank0.up == UpCheck(port=20001)
    assert rank1.up == UpCheck()
    tensor = plan_group(spec("sglang", multinode={"parallel": "tensor"}), engine_for("sglang"), [SPARK_A, SPARK_B], 1)
    assert tensor.parts[1].argv[-2:] == ("--tp-size", "2")


def test_without_cluster_address_the_nodes_address_is_used_and_no_interface_is_forced() -> None:
    plain = spec("vllm", multinode={}, env={})
    a, b = DockerNode(name="a", address="10.0.0.1"), DockerNode(name="b", address="10.0.0.2")
    head, worker = plan_group(plain, engine_for("vllm"), [a, b], 8000).parts
    assert dict(head.env) == {"VLLM_HOST_IP": "10.0.0.1", **RAY}
    assert worker.argv[3] == "10.0.0.1:6379"


def test_the_spec_env_overrides_ours() -> None:
    head, _ = plan_group(spec("vllm", env={"VLLM_HOST_IP": "1.2.3.4"}), engine_for("vllm"), [SPARK_A, SPARK_B], 1).parts
    assert head.env["VLLM_HOST_IP"] == "1.2.3.4"


def test_a_plan_needs_one_node_per_part_and_an_engine_with_a_distributed_mode() -> None:
    with pytest.raises(ValueError, match="spans 2 nodes; 1 given"):
        plan_group(spec("vllm"), engine_for("vllm"), [SPARK_A], 8000)
    with pytest.raises(ValueError, match="can't span several nodes"):
        plan_group(spec("vllm"), engine_for("sglang"), [SPARK_A, SPARK_B], 8000)


def test_part_containers_run_on_the_host_network_with_the_specs_resources_and_group_labels() -> None:
    s = spec("vllm", gpus="all", shm_size="16g", ipc="host", ulimits={"memlock": -1}, volumes=["/w:/w:ro"])
    head, worker = plan_group(s, engine_for("vllm"), [SPARK_A, SPARK_B], 8000).parts
    config = part_config(s, worker, 8000, "h", 2, "default")
    assert config["entrypoint"] == ["ray"]
    assert config["command"] == list(worker.argv[1:])
    assert config["network_mode"] == "host"
    assert "ports" not in config
    assert config["environment"] == dict(worker.env)
    assert config["shm_size"] == "16g" and config["ipc_mode"] == "host" and config["volumes"] == ["/w:/w:ro"]
    assert config["device_requests"][0]["Count"] == -1
    assert config["labels"][LABEL_PART] == "worker-1"
    assert config["labels"][LABEL_GROUP_SIZE] == "2"
    assert config["labels"][LABEL_NODE] == "spark-b"
    assert part_container_name("big", head.role) != part_container_name("big", worker.role)


def test_an_exit_names_the_part_that_ended() -> None:
    assert Exit(137, part="worker-1 on node 'spark-b'").describe() == "code 137 (SIGKILL) in worker-1 on node 'spark-b'"
    assert Exit(1).describe() == "code 1"
