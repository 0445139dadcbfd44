"""The composition root: the runtimes, budgets, labels and live memory probes of a waker, built from the nodes'
configuration (waker.config.nodes.NodeConfig), and the waker itself. The gateway calls `build_waker` with its
settings; nothing else builds these. `resolve_nodes` reads what the configuration leaves out (each node's total
memory) from the machines, with the real readers: this machine's NVML and /proc/meminfo, a remote node's Docker
daemon."""

import os
from collections.abc import Mapping, Sequence

from waker.config import machine
from waker.config.machine import LocalReader, MemoryReading, RemoteReader
from waker.config.nodes import NodeConfig
from waker.config.registry import Registry
from waker.config.spec import RuntimeKind
from waker.options import WakerOptions
from waker.runtime.base import Runtime
from waker.runtime.docker.host import DockerNode
from waker.runtime.docker.memory_probe import DockerMemInfo, DockerMemoryProbe, NodeUnreachable
from waker.runtime.docker.runtime import DockerRuntime
from waker.runtime.external import ExternalRuntime
from waker.runtime.machine import read_local_memory
from waker.runtime.memory import GIB, FixedProbe, make_probe
from waker.runtime.process import ProcessRuntime
from waker.scheduling.budget import Budget, MemoryProbe
from waker.scheduling.node import QueuePolicy
from waker.waker import Waker

LOCAL = {"local": NodeConfig()}


def read_remote_memory(url: str) -> MemoryReading:
    """A remote node's total memory: ``MemTotal`` of its Docker daemon's ``info()`` (host RAM: on a node with
    discrete GPUs, set total_gb). Unified or not can't be told from there."""
    source = DockerMemInfo(url)
    try:
        total = source.total_bytes()
    except NodeUnreachable as exc:
        return MemoryReading(None, None, str(exc))
    finally:
        source.close()
    if not total:
        return MemoryReading(None, None, f"Docker info of {url} has no MemTotal")
    return MemoryReading(total / GIB, None, f"Docker info of {url}")


def resolve_nodes(nodes: Mapping[str, NodeConfig], *, local: LocalReader | None = None,
                  remote: RemoteReader | None = None) -> dict[str, NodeConfig]:
    """`nodes` with each total read from its machine where not configured (see waker/config/machine.py). Blocking
    (a remote daemon may take seconds): at startup and in the reload thread, never per request. Nodes already
    resolved are not read again."""
    return machine.resolve_nodes(nodes, local=local or read_local_memory, remote=remote or read_remote_memory)


def budgets(nodes: Mapping[str, NodeConfig]) -> dict[str, Budget]:
    """Each node's budget: its total (read from the machine when not configured) minus its reserve."""
    resolved = resolve_nodes(nodes)
    return {name: Budget(n.total_gb or machine.DEFAULT_TOTAL_GB, n.reserve_gb) for name, n in resolved.items()}


def labels(nodes: Mapping[str, NodeConfig]) -> dict[str, dict[str, str]]:
    return {name: dict(n.labels) for name, n in nodes.items()}


def docker_nodes(nodes: Mapping[str, NodeConfig]) -> dict[str, DockerNode]:
    return {name: DockerNode(name, n.docker_host, n.address, n.publish_ip, cluster_address=n.cluster_address)
            for name, n in nodes.items()}


def probe(name: str, node: NodeConfig) -> MemoryProbe:
    """The live memory probe of one node: this machine's (NVML, or /proc/meminfo on unified memory) for a local
    Docker host, the node's /proc/meminfo read through its Docker daemon for a remote one."""
    kind = node.probe_kind()
    if kind == "docker":
        # Not started here: it starts on its first reading, or when the waker starts it at boot.
        # docker_host None: DOCKER_HOST and its TLS settings, like the runtime's client.
        where = node.docker_host or os.environ.get("DOCKER_HOST") or "local socket"
        return DockerMemoryProbe(node.docker_host, node=name, interval=node.memory_probe_interval,
                                 name=f"docker ({where})")
    if not node.is_local() and kind != "none":
        # meminfo / nvml read the gateway's machine, which says nothing about a remote node; named
        # explicitly for one it was ignored before "docker" existed, so it still is: the ledger decides.
        return FixedProbe(None, name=f"none ({kind} reads this machine, not {name!r})")
    return make_probe(kind)


def probes(nodes: Mapping[str, NodeConfig]) -> dict[str, MemoryProbe]:
    """A live memory probe per node. Probes with `start()`/`close()` (the Docker one) refresh in a thread: the
    waker starts them at boot and closes them at shutdown (a probe never started starts on its first reading)."""
    return {name: probe(name, n) for name, n in nodes.items()}


def default_runtimes(options: WakerOptions, nodes: Mapping[str, DockerNode] | None = None,
                     instance: str = "default") -> dict[RuntimeKind, Runtime]:
    return {
        RuntimeKind.PROCESS: ProcessRuntime(keep_log_lines=max(200, options.log_tail_lines)),
        RuntimeKind.EXTERNAL: ExternalRuntime(),
        RuntimeKind.DOCKER: DockerRuntime(nodes, instance=instance),
    }


def build_waker(registry: Registry, nodes: Mapping[str, NodeConfig] | None = None, *,
                options: WakerOptions | None = None, queue: QueuePolicy | None = None, preload: Sequence[str] = (),
                instance: str = "default", memory_probes: Mapping[str, MemoryProbe] | None = None) -> Waker:
    """The waker of one gateway: `registry` served on `nodes` (default: this machine only)."""
    nodes = resolve_nodes(nodes or LOCAL)
    options = options or WakerOptions()
    return Waker(registry, options=options, runtimes=default_runtimes(options, docker_nodes(nodes), instance),
                 budgets=budgets(nodes), probes=memory_probes or probes(nodes), queue=queue, preload=preload,
                 labels=labels(nodes))


__all__ = ["budgets", "build_waker", "default_runtimes", "docker_nodes", "labels", "probe", "probes",
           "read_remote_memory", "resolve_nodes"]
