"""ModelSpec: one models.d entry, typed and validated once at the edge."""

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from waker.config.durations import Duration

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _environment(value: dict[str, str]) -> dict[str, str]:
    """Names a process environment can hold: `A=B` would set A, an empty name or a NUL can't be passed at all, and
    both used to pass validation and fail every start of the engine instead."""
    for name, text in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name (letters, digits and _, not starting "
                             "with a digit)")
        if "\0" in text:
            raise ValueError(f"the value of {name} holds a NUL character, which no environment can pass")
    return value


Environment = Annotated[dict[str, str], AfterValidator(_environment)]
"""Environment variables for an engine: POSIX names, values without NUL."""


class EngineKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    TRTLLM = "trtllm"
    LLAMACPP = "llamacpp"
    GENERIC = "generic"
    # Not an OpenAI server: any HTTP (and WebSocket) service, reached under /services/<name>/ (gateway/services.py),
    # woken, budgeted and evicted like a model (ComfyUI: models.d/examples/comfyui.yaml).
    SERVICE = "service"


class RuntimeKind(StrEnum):
    PROCESS = "process"
    DOCKER = "docker"
    EXTERNAL = "external"


class IdleAction(StrEnum):
    STOP = "stop"
    SLEEP = "sleep"  # vLLM sleep mode / SGLang memory release: the engine stays up, memory is freed


class Progress(StrEnum):
    """How a streaming chat completion that waits for its model is shown the wake (gateway/progress.py): opt-in, per
    model (models.d `progress`) and per API key (`progress`; the key wins)."""

    OPEN_WEBUI = "open-webui"  # Open WebUI's own status line (chunks with an `event` and no `choices`)
    REASONING = "reasoning"  # `delta.reasoning_content` lines, for chat clients that show reasoning
    OFF = "off"  # SSE comments only


class UlimitRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    soft: int
    hard: int


Ulimit = int | UlimitRange
"""One limit for both soft and hard (-1 = unlimited), or {soft, hard}."""

GpuRequest = Literal["all"] | int | tuple[str, ...] | None


class MultiNode(BaseModel):
    """How the parts of a model that spans several nodes (`nodes` > 1) find each other.

    vLLM: a Ray head container on the first node, a Ray worker container on each other node, then
    `vllm serve --distributed-executor-backend ray` run in the head container. SGLang: one container
    per node with `--nnodes N --node-rank i --dist-init-addr <first node>:<port>` (a free port from dist_port on).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ray_port: int = Field(default=6379, ge=1, le=65535,
                          description="vLLM: the first port tried for the Ray head (GCS); each start picks a free one")
    dist_port: int = Field(default=20000, ge=1, le=65535,
                           description="SGLang: the first --dist-init-addr port tried; each start picks a free one")
    interface: str | None = Field(
        default=None, description="network interface between the nodes (QSFP link), e.g. enp1s0f1np1: sets "
        "NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME and UCX_NET_DEVICES in every part",
    )
    parallel: Literal["pipeline", "tensor"] = Field(
        default="pipeline", description="how the model is split across the nodes: pipeline (--pipeline-parallel-size) "
        "or tensor (--tensor-parallel-size / --tp)",
    )
    head_env: Environment = Field(default_factory=dict, description="extra environment for the head part only")
    worker_env: Environment = Field(default_factory=dict, description="extra environment for worker parts only")
    join_timeout: Duration = Field(default=300.0, gt=0, description="give up if a part is not up by then")


class ModelSpec(BaseModel):
    """What can be served under one name, and how its engine is run.

    Unknown keys are errors (a typo such as `idle_timout` must not be silently ignored).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="the model name clients send")
    aliases: tuple[str, ...] = Field(default=(), description="other names that route here")
    # What clients are told about it (/v1/models): display only, never part of the engine (see _POLICY_FIELDS).
    display_name: str | None = Field(default=None, min_length=1, max_length=200,
                                     description="the name clients show for it (`name` in /v1/models); default: name")
    description: str | None = Field(default=None, max_length=2000, description="a line about it, for /v1/models")
    context_length: int | None = Field(
        default=None, ge=1, description="the context window /v1/models lists (context_length, max_model_len); "
        "default: the engine's context flag in args (--max-model-len, --context-length, --max_seq_len, -c)")
    engine: EngineKind = EngineKind.GENERIC
    runtime: RuntimeKind = RuntimeKind.PROCESS

    model: str | None = Field(default=None, description="weights: a path or a hub id, given to the engine")
    served_name: str | None = Field(default=None, description="name the engine serves; default: name")
    command: tuple[str, ...] | None = Field(
        default=None, description="executable and leading args; replaces the engine's default launcher"
    )
    args: tuple[str, ...] = Field(default=(), description="extra engine arguments, appended")
    env: Environment = Field(default_factory=dict)
    workdir: str | None = Field(default=None, description="process runtime: working directory")
    image: str | None = Field(default=None, description="docker runtime: image")
    url: str | None = Field(default=None, description="external runtime: base URL, e.g. http://host:8000/v1")
    host: str = Field(default="127.0.0.1", description="address the engine listens on")
    port: int | None = Field(default=None, ge=1, le=65535, description="engine port; default: a free one")
    api_key: str | None = Field(default=None, description="key the gateway sends to the engine")

    node: str | tuple[str, ...] | None = Field(
        default=None, description="docker runtime: the node (Docker host) it may run on, or a list; default: any"
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="docker runtime: only nodes carrying all these labels, e.g. {gpu: gb10}"
    )
    nodes: int = Field(
        default=1, ge=1, le=16, description="docker runtime: nodes one instance spans (vLLM + Ray, SGLang --nnodes); "
        "memory_gb is then what it takes on each of them",
    )
    multinode: MultiNode = Field(default_factory=MultiNode, description="nodes > 1: how the parts connect")
    placed_on: tuple[str, ...] = Field(
        default=(), exclude=True, description="set by the waker when it starts the engine: the node(s) it runs on"
    )
    volumes: tuple[str, ...] = Field(default=(), description="docker: host:container[:ro|rw]; ~ expanded")
    gpus: GpuRequest = Field(default=None, description='docker: "all", a count, or device ids ["0", "1"]')
    shm_size: str | None = Field(default=None, description='docker: /dev/shm size, e.g. "16g"')
    ipc: str | None = Field(default=None, description='docker: IPC mode, e.g. "host"')
    ulimits: dict[str, Ulimit] = Field(default_factory=dict, description="docker: e.g. {memlock: -1}")
    network: str | None = Field(default=None, description='docker: "host" or a network name')
    container_port: int = Field(default=8000, ge=1, le=65535, description="docker: port inside the container")
    # A container memory limit below the device's total has made vLLM fail with an illegal memory access on GB10
    # (reported by users running vLLM on a DGX Spark): leave it unset there.
    mem_limit: str | None = Field(default=None, description='docker: hard memory cap, e.g. "70g" (not on a DGX Spark)')
    init: bool = Field(default=False, description="docker: run an init as PID 1 (engines that ignore SIGTERM)")
    keep_container: bool = Field(default=False, description="docker: keep it when stopped; faster restart")

    memory_gb: float = Field(
        default=0.0, ge=0,
        description='memory the engine may take, in GiB; "auto": the learned peak (stats) x 1.2 once sampled',
    )
    memory_auto: bool = Field(default=False, exclude=True, description="memory_gb was 'auto' (resolved at load)")
    memory_fraction_derived: bool = Field(
        default=False, exclude=True,
        description="gpu_memory_utilization was derived from memory_gb and the node's total (set at load)",
    )

    @model_validator(mode="before")
    @classmethod
    def _auto_memory(cls, data: object) -> object:
        # "auto" is resolved by the loader from learned footprints; until then it holds 0 and is flagged.
        if isinstance(data, dict) and data.get("memory_gb") == "auto":
            return {**data, "memory_gb": 0.0, "memory_auto": True}
        return data
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="fraction of GPU memory given to the engine's memory flag"
    )

    idle_timeout: Duration = Field(default=900.0, description="stop after this long idle; 0 = never")
    idle_action: IdleAction = IdleAction.STOP
    sleep_level: int = Field(
        default=2, ge=1, le=2,
        description="what a sleep releases. vLLM: 1 moves the weights to CPU RAM and drops the KV cache, 2 drops both "
        "(the wake reloads the weights). SGLang: 1 releases the KV cache and CUDA graphs and keeps the weights in GPU "
        "memory, 2 releases everything (the wake reloads the weights from disk). 2 is the default: on unified memory "
        "CPU RAM is the same pool, so vLLM's level 1 frees almost nothing",
    )
    sleep_level_1_on_unified_memory: bool = Field(
        default=False, description="vLLM: allow sleep_level 1 where the memory is unified (DGX Spark, GB10), which "
        "is refused by default: it frees little there and its wake can hang the host (vLLM #50011)",
    )
    sleep_memory_gb: float | None = Field(
        default=None, ge=0, description="what a sleeping engine still holds; default: its sleep peak x 1.2 once the "
        "stats sampler has seen it asleep (never above memory_gb), else min(4, memory_gb) at sleep_level 2 and "
        "memory_gb at level 1",
    )
    sleep_memory_learned: bool = Field(
        default=False, exclude=True, description="sleep_memory_gb was learned from the stats (set at load)"
    )
    wake_timeout: Duration = Field(
        default=120.0, gt=0, description="give up waking after this long: the whole wake, its calls and the check after"
    )
    reset_prefix_cache: bool = Field(
        default=False, description="vLLM: also POST /reset_prefix_cache after a wake (releases before Aug 2025 kept "
        "stale prefix-cache entries across a level-2 sleep)")
    shutdown_drain: bool = Field(
        default=True, description="vLLM: pass --shutdown-timeout (3/4 of stop_timeout) so a stop lets running requests "
        "finish; false for vLLM older than 0.18, which rejects the flag")
    min_uptime: Duration = Field(default=60.0, description="never stop sooner than this after READY")
    start_timeout: Duration = Field(default=600.0, gt=0, description="give up if not ready by then")
    stop_timeout: Duration = Field(default=20.0, description="grace between SIGTERM and SIGKILL")
    health_path: str | None = Field(default=None, description="readiness path; default: the engine's")

    pinned: bool = False
    priority: int = 0
    max_concurrent: int | None = Field(default=None, ge=1, description="requests at once; more wait for a slot")
    max_waiting: int = Field(default=64, ge=0, description="requests waiting for a slot; beyond: 429")
    progress: Progress | None = Field(
        default=None, description="show a wake to streaming chat completions: open-webui (its status line), "
        "reasoning (reasoning_content lines) or off; unset: off (an API key's own `progress` wins)")

    source: Path | None = Field(default=None, exclude=True, description="file this spec came from")

    @field_validator("name", "served_name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):  # match() let a trailing newline through
            raise ValueError(f"{value!r} is not a valid model name (letters, digits and ._:/@+- only)")
        return value

    @field_validator("command", "args")
    @classmethod
    def _passable(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any("\0" in arg for arg in value):
            raise ValueError("an argument holds a NUL character, which no command line can pass")
        return value

    @field_validator("aliases")
    @classmethod
    def _valid_aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            cls._valid_name(alias)
        if len(set(value)) != len(value):
            raise ValueError("an alias is listed twice")
        return value

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    @model_validator(mode="after")
    def _runtime_needs(self) -> Self:
        if self.name in self.aliases:
            raise ValueError(f"alias {self.name!r} repeats the model's own name")
        if self.runtime is RuntimeKind.EXTERNAL:
            if not self.url:
                raise ValueError("runtime external needs url (the endpoint's base URL, e.g. http://host:8000/v1)")
            if not self.url.startswith(("http://", "https://")):
                raise ValueError("url must start with http:// or https://")
        elif self.url:
            raise ValueError(f"url is only for runtime external (this model's runtime is {self.runtime})")
        if self.runtime is RuntimeKind.DOCKER and not self.image:
            raise ValueError("runtime docker needs image")
        if self.image and self.runtime is not RuntimeKind.DOCKER:
            raise ValueError(f"image is only for runtime docker (this model's runtime is {self.runtime})")
        for volume in self.volumes:
            parts = volume.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or (
                    len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"volume {volume!r} must be host_path:/container/path[:ro|rw]")
        if self.runtime is RuntimeKind.PROCESS and self.engine is EngineKind.GENERIC and not self.command:
            raise ValueError("engine generic on runtime process needs command (the program to run)")
        if self.nodes > 1:
            if self.runtime is not RuntimeKind.DOCKER:
                raise ValueError(f"nodes: {self.nodes} needs runtime docker (one container per node)")
            if self.engine not in (EngineKind.VLLM, EngineKind.SGLANG):
                raise ValueError(f"nodes: {self.nodes} needs engine vllm (Ray) or sglang (--nnodes); not {self.engine}")
            if self.network not in (None, "host"):
                raise ValueError(f"nodes: {self.nodes} runs its parts on the host network; network {self.network!r} "
                                 "can't be used")
            if self.idle_action is IdleAction.SLEEP:
                raise ValueError("idle_action sleep is for models on one node")
            if isinstance(self.node, tuple) and len(self.node) < self.nodes:
                raise ValueError(f"nodes: {self.nodes} but node lists only {len(self.node)}")
            if isinstance(self.node, str):
                raise ValueError(
                    f"nodes: {self.nodes} can't run on the one node {self.node!r}; list {self.nodes} or more")
        if isinstance(self.node, tuple) and (not self.node or len(set(self.node)) != len(self.node)):
            raise ValueError("node: list each node once (or leave it out for any node)")
        if self.idle_action is IdleAction.SLEEP and self.engine not in (EngineKind.VLLM, EngineKind.SGLANG):
            raise ValueError(f"idle_action sleep needs engine vllm or sglang (engine {self.engine} has no sleep API)")
        if self.engine in (EngineKind.VLLM, EngineKind.SGLANG, EngineKind.TRTLLM, EngineKind.LLAMACPP):
            if self.runtime is not RuntimeKind.EXTERNAL and not self.model:
                raise ValueError(f"engine {self.engine} needs model (a weights path or hub id)")
        if self.engine is EngineKind.SERVICE:
            self._service_needs()
        return self

    def _service_needs(self) -> None:
        """A service is reached as /services/<name>/ and speaks no OpenAI: its names are one plain path segment, it
        has no served model name, and the gateway launches it (the Docker runtime replaces the image's entrypoint)."""
        for name in self.names:
            if not _SERVICE_NAME.fullmatch(name):
                raise ValueError(f"service name {name!r} is a path segment (/services/{name}/): letters, digits and "
                                 "._- only")
        if self.served_name is not None:
            raise ValueError("served_name is for OpenAI engines: a service is reached by its path, not a model name")
        if self.runtime is not RuntimeKind.EXTERNAL and not self.command:
            raise ValueError(f"engine service on runtime {self.runtime} needs command (the program to run)")

    @property
    def upstream_name(self) -> str:
        """The model name the engine itself answers to."""
        return self.served_name or self.name

    @property
    def candidate_nodes(self) -> tuple[str, ...] | None:
        """The node names this model may run on, or None for any (labels still apply)."""
        if self.node is None:
            return None
        return (self.node,) if isinstance(self.node, str) else self.node

    @property
    def home(self) -> str | None:
        """The node it runs on (the first, the head, for several); None before it is placed."""
        if self.placed_on:
            return self.placed_on[0]
        return self.node if isinstance(self.node, str) else None

    @property
    def sleeping_gb(self) -> float:
        """What the engine holds asleep: sleep_memory_gb (given, or learned at load), else a default on the safe side.

        Level 2 keeps the CUDA context, the CUDA graph pool and workspaces: vLLM measured 2.75-4.2 GiB on an H100,
        plus the host process's own memory on unified memory, so min(4, memory_gb). Level 1 keeps the weights:
        vLLM moves them to host RAM (on unified memory the same pool), SGLang keeps them in GPU memory and releases
        only the KV cache and CUDA graphs; both counted as the whole memory_gb, an over-count that never lets a
        sleeping model's memory be promised to another.
        """
        if self.sleep_memory_gb is not None:
            return self.sleep_memory_gb
        if self.sleep_level == 1:
            return self.memory_gb
        return min(4.0, self.memory_gb)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def manages_lifecycle(self) -> bool:
        return self.runtime is not RuntimeKind.EXTERNAL

    def spec_hash(self) -> str:
        """Stable digest of everything that shapes the running engine; policy (names, timeouts,
        memory accounting, priority) is left out so changing it never recreates a container."""
        shaping = self.model_dump(mode="json", exclude=_POLICY_FIELDS)
        blob = json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_POLICY_FIELDS = {
    "name", "aliases", "memory_gb", "idle_timeout", "idle_action", "min_uptime", "start_timeout",
    "stop_timeout", "health_path", "pinned", "priority", "keep_container", "source", "sleep_memory_gb",
    "memory_auto", "node", "node_labels", "placed_on",
    "memory_fraction_derived", "sleep_memory_learned", "sleep_level_1_on_unified_memory",
    "wake_timeout", "max_concurrent", "max_waiting", "reset_prefix_cache", "shutdown_drain",
    "display_name", "description", "context_length", "progress",
}
