"""The nodes engines run on: one Docker host each, with its memory budget, labels and live memory probe.

Data only, typed once at the edge (the gateway's `SPARKGATE_NODES` setting); waker/compose.py builds the
runtimes, budgets and probes from it. A total left unset is read from the machine at startup
(waker/config/machine.py), which fills in `total_gb`, `total_source` and, where it can tell, `unified_memory`.
"""

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from waker.config.durations import Duration


class NodeConfig(BaseModel):
    """A Docker host that engines with `runtime: docker` run on."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON's Infinity would be an endless total_gb

    docker_host: str | None = Field(
        default=None, description="unix://, tcp:// or ssh://user@host; default: DOCKER_HOST or the local socket"
    )
    address: str = Field(default="127.0.0.1", description="address the gateway uses to reach engines there")
    publish_ip: str = Field(default="127.0.0.1", description="address engine ports are published on there")
    total_gb: float | None = Field(
        default=None, gt=0, description="memory of the node in GiB; default: read at startup (unified memory or no "
        "GPU: /proc/meminfo MemTotal; discrete GPUs: their total from NVML; a remote node: its Docker daemon's "
        "MemTotal; else 128)",
    )
    unified_memory: bool | None = Field(
        default=None, description="CPU and GPU share one memory (DGX Spark, GB10); default: told by NVML for a local "
        "node, unknown for a remote one",
    )
    cuda_total_gb: float | None = Field(
        default=None, gt=0, description="what CUDA reports as the total, for `sparkgate check`'s fit check; default: "
        "total_gb less 2.1 GiB on unified memory (a GB10: 121.69 GiB MemTotal, 119.56 GiB to CUDA), total_gb on "
        "discrete GPUs",
    )
    total_source: str | None = Field(
        default=None, exclude=True, description="set at startup: where total_gb came from (\"configured\", \"NVML: 2 "
        "GPUs\", ...)",
    )
    reserve_gb: float = Field(default=8.0, ge=0, description="kept free for the OS, the gateway and page cache")
    memory_probe: str = Field(
        default="auto", pattern="^(auto|meminfo|nvml|docker|none)$",
        description="live free memory: auto (this machine's: NVML, or /proc/meminfo on unified memory; for a remote "
                    "docker_host: its /proc/meminfo read through Docker), meminfo, nvml, docker, none",
    )
    memory_probe_interval: Duration = Field(
        default=5.0, gt=0, description="seconds between reads of the docker memory probe (stale after 3)"
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description='facts for placement, e.g. {"gpu": "gb10", "link": "qsfp"}'
    )
    cluster_address: str | None = Field(
        default=None, description="address on the inter-node link (e.g. the QSFP IP) for multi-node engines; "
                                  "default: address",
    )

    @field_validator("docker_host")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("unix://", "tcp://", "ssh://", "http://", "https://")):
            raise ValueError("docker_host must start with unix://, tcp:// or ssh://")
        return value

    @field_validator("total_source")
    @classmethod
    def _not_settable(cls, value: str | None) -> str | None:
        # Filled in by waker.config.machine.resolve_nodes (through model_copy, which doesn't validate); a source
        # written in the settings would claim a reading that never happened.
        if value is not None:
            raise ValueError("total_source is set by the gateway; set total_gb instead")
        return value

    def docker_url(self) -> str:
        """The Docker host as a URL, for messages and for reading a remote node: docker_host, DOCKER_HOST, or the
        local socket."""
        return self.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    def is_local(self) -> bool:
        """Whether the Docker host is this machine: no docker_host (nor DOCKER_HOST), or a unix socket."""
        host = self.docker_host or os.environ.get("DOCKER_HOST")
        return host is None or host.startswith("unix://")

    def probe_kind(self) -> str:
        """What "auto" stands for here: this machine's probe for a local Docker host, Docker's for a remote one."""
        if self.memory_probe != "auto":
            return self.memory_probe
        return "auto" if self.is_local() else "docker"


__all__ = ["NodeConfig"]
