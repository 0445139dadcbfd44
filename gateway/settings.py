"""Gateway settings: environment (SPARKGATE_*), then command-line flags on top."""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.auth import ApiKeySpec
from stats.store import default_db_path
from waker.config.durations import Duration
from waker.options import WakerOptions
from waker.runtime.docker.host import DockerNode
from waker.runtime.docker.memory_probe import DockerMemoryProbe
from waker.runtime.memory import FixedProbe, MemoryProbe, make_probe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy


class NodeSettings(BaseModel):
    """A Docker host that engines with `runtime: docker` run on."""

    model_config = ConfigDict(extra="forbid")

    docker_host: str | None = Field(
        default=None, description="unix://, tcp:// or ssh://user@host; default: DOCKER_HOST or the local socket"
    )
    address: str = Field(default="127.0.0.1", description="address the gateway uses to reach engines there")
    publish_ip: str = Field(default="127.0.0.1", description="address engine ports are published on there")
    total_gb: float = Field(default=128.0, gt=0, description="memory of the node in GiB (a DGX Spark: 128)")
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

    def is_local(self) -> bool:
        """Whether the Docker host is this machine: no docker_host (nor DOCKER_HOST), or a unix socket."""
        host = self.docker_host or os.environ.get("DOCKER_HOST")
        return host is None or host.startswith("unix://")

    def probe_kind(self) -> str:
        """What "auto" stands for here: this machine's probe for a local Docker host, Docker's for a remote one."""
        if self.memory_probe != "auto":
            return self.memory_probe
        return "auto" if self.is_local() else "docker"

    def make_probe(self, name: str) -> MemoryProbe:
        kind = self.probe_kind()
        if kind == "docker":
            # Not started here: it starts on its first reading, or when the waker starts it at boot.
            # docker_host None: DOCKER_HOST and its TLS settings, like the runtime's client.
            where = self.docker_host or os.environ.get("DOCKER_HOST") or "local socket"
            return DockerMemoryProbe(self.docker_host, node=name, interval=self.memory_probe_interval,
                                     name=f"docker ({where})")
        if not self.is_local() and kind != "none":
            # meminfo / nvml read the gateway's machine, which says nothing about a remote node; named
            # explicitly for one it was ignored before "docker" existed, so it still is: the ledger decides.
            return FixedProbe(None, name=f"none ({kind} reads this machine, not {name!r})")
        return make_probe(kind)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARKGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8009, ge=0, le=65535)
    config_dir: Path = Path("models.d")

    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="larger bodies get 413")
    keepalive_interval: Duration = Field(
        default=5.0, description="SSE comment every this long while a stream waits for a cold model; 0 = off"
    )
    upstream_connect_timeout: Duration = 10.0
    upstream_read_timeout: Duration = Field(
        default=900.0, description="longest silence from an engine mid-request before 504"
    )

    probe_interval: Duration = 0.05
    probe_timeout: Duration = 2.0
    reap_interval: Duration = 1.0
    log_tail_lines: int = Field(default=40, ge=0)
    backoff_cap: Duration = 300.0

    nodes: dict[str, NodeSettings] = Field(
        default_factory=lambda: {"local": NodeSettings()},
        description='Docker hosts by name, as JSON: {"local": {}, "spark2": {"docker_host": "ssh://me@spark2"}}',
    )

    max_queue: int = Field(default=256, ge=0, description="requests waiting for room per node; beyond: 429")
    max_wait: Duration = Field(default=600.0, description="longest wait for room; beyond: 503 with the numbers")
    max_hold: Duration = Field(
        default=60.0, description="how long a busy model keeps taking new work while another waits for its memory"
    )
    preload: list[str] = Field(default_factory=list, description="models started at boot, in this order")

    api_keys: list[ApiKeySpec] = Field(
        default_factory=list, description='client keys, JSON: [{"key": "...", "name": "laptop", "models": ["*"]}]'
    )
    api_keys_file: Path | None = Field(default=None, description="a YAML/JSON file with the same list")
    admin_key: str | None = Field(default=None, description="key for /admin routes (separate from client keys)")
    insecure_no_auth: bool = Field(default=False, description="allow binding a non-loopback address without keys")
    cors_origins: list[str] = Field(default_factory=list, description='browser origins allowed, e.g. ["*"]')
    max_header_bytes: int = Field(default=64 * 1024, gt=0, description="larger request headers get 431")
    stats_db: Path = Field(default_factory=default_db_path, description="SQLite file of per-model memory samples")
    stats_interval: Duration = Field(default=5.0, description="memory sampling interval; 0 = off")
    watch_config: bool = Field(default=False, description="reload models.d when its files change")
    instance: str = Field(
        default="default", pattern=r"^[A-Za-z0-9_.-]+$",
        description="name of this gateway on its Docker hosts; gateways sharing a daemon need different names",
    )
    request_timeout: Duration = Field(default=3600.0, description="longest a request may take in all; 0 = no limit")

    def budgets(self) -> dict[str, Budget]:
        return {name: Budget(n.total_gb, n.reserve_gb) for name, n in self.nodes.items()}

    def probes(self) -> dict[str, MemoryProbe]:
        """A live memory probe per node: this machine's for local Docker hosts, through Docker for remote ones.

        Probes with ``start()``/``close()`` (the Docker one) refresh in a thread: start them at boot, close them at
        shutdown (a probe never started starts on its first reading)."""
        return {name: n.make_probe(name) for name, n in self.nodes.items()}

    def node_labels(self) -> dict[str, dict[str, str]]:
        return {name: dict(n.labels) for name, n in self.nodes.items()}

    def queue_policy(self) -> QueuePolicy:
        return QueuePolicy(max_queue=self.max_queue, max_wait=self.max_wait, max_hold=self.max_hold)

    def docker_nodes(self) -> dict[str, DockerNode]:
        return {name: DockerNode(name, n.docker_host, n.address, n.publish_ip, cluster_address=n.cluster_address)
                for name, n in self.nodes.items()}

    def waker_options(self) -> WakerOptions:
        return WakerOptions(
            probe_interval=self.probe_interval,
            probe_timeout=self.probe_timeout,
            reap_interval=self.reap_interval,
            log_tail_lines=self.log_tail_lines,
            backoff_cap=self.backoff_cap,
        )
