"""The parts of a model that spans several nodes, in launch order (pure: no I/O, unit-tested).

Each engine's own distributed mode, never one of ours:
- vLLM + Ray, as NVIDIA's DGX Spark playbook ("vLLM on stacked Sparks") and vLLM's run_cluster.sh do it: a
  container on the first node runs the Ray head (`ray start --head --port P --node-ip-address A --block`), a
  container on each other node joins it (`ray start --address A:P --node-ip-address B --block`), then
  `vllm serve ... --distributed-executor-backend ray --pipeline-parallel-size N` runs inside the head
  container (`docker exec`) and spreads the model over the cluster. "Ray runtime started." is what
  `ray start` prints once the node is up, head or worker.
- SGLang: the same `launch_server` in one container per node, `--nnodes N --node-rank i --dist-init-addr
  A:P`; rank 0 opens the rendezvous port, serves HTTP, and waits for the other ranks.

Every part runs on the host network (the parts talk over the nodes' link, e.g. the QSFP cable between two
DGX Sparks). NCCL, Gloo, TensorPipe and UCX are pointed at `multinode.interface` when it is set; VLLM_HOST_IP
is the node's own link address (vLLM and Ray otherwise guess an interface, often the wrong one).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import Engine, Launch
from waker.engines.sglang import SglangEngine
from waker.engines.vllm import VllmEngine

HEAD = "head"
RAY_STARTED = r"Ray runtime started"
_INTERFACE_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "UCX_NET_DEVICES")


class ClusterNode(Protocol):
    """What the plan needs of a node (waker.runtime.docker.DockerNode is one)."""

    @property
    def name(self) -> str: ...

    @property
    def link_address(self) -> str:
        """The address the other nodes reach this one at."""
        ...


@dataclass(frozen=True, slots=True)
class UpCheck:
    """How to tell a part is up (its container must be running, and): `log` (a regex) appears in its
    output, and/or `port` accepts TCP connections on its node. Neither: up once running."""

    log: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """One container of the group: `argv` replaces the image's entrypoint and command."""

    role: str
    node: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    up: UpCheck = UpCheck()

    def describe(self) -> str:
        return f"{self.role} on node {self.node!r}"


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """The parts in start order (head first), and for vLLM the command run in the head once all are up; `port`:
    HTTP on the head; `rendezvous`: where the parts meet on the head (Ray's GCS, SGLang's --dist-init-addr)."""

    parts: tuple[Part, ...]
    serve: tuple[str, ...] | None
    port: int
    rendezvous: int

    @property
    def head(self) -> Part:
        return self.parts[0]


def worker_role(index: int) -> str:
    return f"worker-{index}"


def role_at(index: int) -> str:
    """The role of the part on the group's `index`-th node (head first)."""
    return HEAD if index == 0 else worker_role(index)


def rendezvous_base(spec: ModelSpec) -> int:
    """The first rendezvous port a start of `spec` tries on its head node: `multinode.ray_port` (vLLM: Ray's GCS)
    or `multinode.dist_port` (SGLang: --dist-init-addr). The runtime picks the port of each start from there up,
    so that two groups whose heads share a node (host network) never ask for the same one."""
    return spec.multinode.ray_port if spec.engine is EngineKind.VLLM else spec.multinode.dist_port


def plan_group(spec: ModelSpec, engine: Engine, nodes: Sequence[ClusterNode], port: int,
               rendezvous: int | None = None) -> GroupPlan:
    """The parts of `spec` on `nodes` (head first, as `spec.placed_on`), serving HTTP on `port` on the head and
    meeting on the head's `rendezvous` port (None: `rendezvous_base(spec)`, the configured one).

    SGLang ranks >= 1 listen on `port + rank` for their dummy /health (SGLang binds one on --host/--port
    there), so parts that share a host never collide.
    """
    if len(nodes) != spec.nodes or spec.nodes < 2:
        raise ValueError(f"{spec.name} spans {spec.nodes} nodes; {len(nodes)} given")
    meet = rendezvous_base(spec) if rendezvous is None else rendezvous
    if spec.engine is EngineKind.VLLM and isinstance(engine, VllmEngine):
        return _vllm_ray(spec, engine, nodes, port, meet)
    if spec.engine is EngineKind.SGLANG and isinstance(engine, SglangEngine):
        return _sglang(spec, engine, nodes, port, meet)
    raise ValueError(f"{spec.name}: engine {spec.engine} can't span several nodes (vllm or sglang can)")


def _vllm_ray(spec: ModelSpec, engine: VllmEngine, nodes: Sequence[ClusterNode], port: int, meet: int) -> GroupPlan:
    head = nodes[0]
    started = UpCheck(log=RAY_STARTED)
    parts = [Part(HEAD, head.name, ("ray", "start", "--head", "--port", str(meet), "--node-ip-address",
                                    head.link_address, "--block"),
                  _env(spec, head, head=True), started)]
    for index, node in enumerate(nodes[1:], start=1):
        argv = ("ray", "start", "--address", f"{head.link_address}:{meet}", "--node-ip-address",
                node.link_address, "--block")
        parts.append(Part(worker_role(index), node.name, argv, _env(spec, node, head=False), started))
    serve = engine.ray_argv(spec, Launch(host=spec.host, port=port), len(nodes))
    return GroupPlan(tuple(parts), tuple(serve), port, meet)


def _sglang(spec: ModelSpec, engine: SglangEngine, nodes: Sequence[ClusterNode], port: int, meet: int) -> GroupPlan:
    rendezvous = f"{nodes[0].link_address}:{meet}"
    parts = []
    for rank, node in enumerate(nodes):
        argv = engine.rank_argv(spec, Launch(host=spec.host, port=port + rank), len(nodes), rank, rendezvous)
        role = role_at(rank)
        # Rank 0 is up once its rendezvous port is open; the others only once every rank has joined and
        # loaded its share, which is the model's readiness, so they count as up once running.
        up = UpCheck(port=meet) if rank == 0 else UpCheck()
        parts.append(Part(role, node.name, tuple(argv), _env(spec, node, head=rank == 0), up))
    return GroupPlan(tuple(parts), None, port, meet)


def _env(spec: ModelSpec, node: ClusterNode, head: bool) -> dict[str, str]:
    """Ours first, then the spec's env, then head_env / worker_env: the user's values win."""
    env: dict[str, str] = {}
    if spec.engine is EngineKind.VLLM:
        env["VLLM_HOST_IP"] = node.link_address
        # Ray's memory monitor kills workers when the node looks 95 % full; on unified memory the GPU's share
        # counts as used, so a loaded Spark always looks full. NVIDIA's two-Spark vLLM playbook turns it off.
        env["RAY_memory_monitor_refresh_ms"] = "0"
    if spec.multinode.interface:
        env.update(dict.fromkeys(_INTERFACE_VARS, spec.multinode.interface))
    env.update(spec.env)
    env.update(spec.multinode.head_env if head else spec.multinode.worker_env)
    return env


__all__ = [
    "HEAD", "ClusterNode", "GroupPlan", "Part", "UpCheck", "plan_group", "rendezvous_base", "role_at", "worker_role",
]
