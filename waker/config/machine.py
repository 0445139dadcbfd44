"""Each node's memory, taken from the machine when the settings don't say: its total and whether it is unified.

The budget of a node is ``total_gb - reserve_gb``. A fixed default (a DGX Spark's 121.7) is wrong on every other box: a
24 GB workstation would promise engines memory it doesn't have, and an 8-GPU server would leave most of its cards
idle. So an unset ``total_gb`` is read once, when the gateway starts (and when models.d is reloaded without the
started gateway's nodes), never per request:

* a local node (no ``docker_host``, or a unix socket): this machine. Unified memory (NVML answers "Not Supported"
  for memory info, as on GB10) and a machine with no GPU: ``/proc/meminfo`` MemTotal; discrete GPUs: the sum of
  the GPUs' totals from NVML (what engines allocate from; host RAM says nothing about what fits on the cards);
* a remote node (``tcp://``, ``ssh://``): ``MemTotal`` of its Docker daemon's ``info()``, when it answers;
* anything else: 121.7 (what a DGX Spark shows), with a warning that says why.

Whether a node's memory is unified matters beyond the total: vLLM's sleep level 1 moves the weights to CPU RAM,
which on unified memory is the same pool (see gateway/config.py). A local node's answer comes from NVML; a remote
node's is unknown (None) unless its ``unified_memory`` is configured.

The readers are passed in (``local``: this machine; ``remote``: a Docker host's total): this module does no I/O,
so the rules are tested without a GPU or a daemon. waker/compose.py passes the real ones.
"""

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from waker.config.nodes import NodeConfig

log = logging.getLogger("sparkgate.config")

DEFAULT_TOTAL_GB = 121.7
"""What a DGX Spark shows the OS of its 128 GB (MemTotal 121.69 GiB, as Ray and vLLM report it on a GB10):
the figure used when a node's total can't be read."""


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """What a reader found: the total in GiB (None: it couldn't say), whether the memory is unified (None: unknown),
    and where the figure came from, or why there is none (shown by ``sparkgate check`` and ``status``)."""

    total_gb: float | None
    unified: bool | None
    source: str


LocalReader = Callable[[], MemoryReading]
"""Reads this machine (NVML, /proc/meminfo)."""

RemoteReader = Callable[[str], MemoryReading]
"""Reads the machine behind a Docker host URL (its daemon's ``info()``)."""


def is_resolved(node: NodeConfig) -> bool:
    """Whether `node`'s memory has been resolved (its total and the total's source are known)."""
    return node.total_gb is not None and node.total_source is not None


def resolve_nodes(nodes: Mapping[str, NodeConfig], *, local: LocalReader,
                  remote: RemoteReader) -> dict[str, NodeConfig]:
    """`nodes` with every total, its source and (where it can be told) unified memory filled in.

    A configured ``total_gb`` always wins (source "configured"); ``unified_memory`` likewise. This machine is read at
    most once, and only when a local node needs it; a remote node is read only when its total is not configured.
    Nodes resolved before are returned as they are, so calling this again costs nothing.
    """
    here: list[MemoryReading] = []

    def read_here() -> MemoryReading:
        if not here:
            here.append(local())
        return here[0]

    return {name: node if is_resolved(node) else _resolve(name, node, read_here, remote)
            for name, node in nodes.items()}


def _resolve(name: str, node: NodeConfig, local: LocalReader, remote: RemoteReader) -> NodeConfig:
    unified = node.unified_memory
    if node.is_local():
        if node.total_gb is not None and unified is not None:
            reading = MemoryReading(node.total_gb, unified, "configured")
        else:
            reading = local()
    elif node.total_gb is None:
        reading = remote(node.docker_url())
    else:
        reading = MemoryReading(node.total_gb, None, "configured")
    if unified is None:
        unified = reading.unified
    if node.total_gb is not None:
        total, source = node.total_gb, "configured"
    elif reading.total_gb is not None and reading.total_gb >= 0.1:
        # Down to a tenth: budgets and messages read "23.5 GB", not 23.5401, and never promise what isn't there.
        total, source = math.floor(reading.total_gb * 10 + 1e-9) / 10, reading.source
    else:
        total, source = DEFAULT_TOTAL_GB, f"default {DEFAULT_TOTAL_GB:g}: {reading.source}"
        log.warning("node %r: its memory could not be read (%s); taking %g GB: set total_gb in SPARKGATE_NODES",
                    name, reading.source, DEFAULT_TOTAL_GB)
    # model_copy: no validation, which is what lets the resolved source in (a user can't set it).
    return node.model_copy(update={"total_gb": total, "total_source": source, "unified_memory": unified})


def describe_unified(unified: bool | None) -> str:
    """"unified", "separate" or "unknown": how ``sparkgate check`` and ``status`` say it."""
    return "unknown" if unified is None else ("unified" if unified else "separate")


__all__ = ["DEFAULT_TOTAL_GB", "LocalReader", "MemoryReading", "RemoteReader", "describe_unified", "is_resolved",
           "resolve_nodes"]
