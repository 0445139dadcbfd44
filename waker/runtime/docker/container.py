"""One engine container: its labels, its configuration (pure), its handle (wait, stop, logs), and what its
memory cgroup holds (for stats)."""

import asyncio
import hashlib
import io
import json
import math
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import DeviceRequest, Ulimit

from waker.config.spec import ModelSpec, UlimitRange
from waker.engines.base import Engine, Launch
from waker.runtime.base import ContainerMemory, Exit, RuntimeUnavailable
from waker.runtime.docker.host import DockerHost, DockerNode

LABEL_MANAGED = "sparkgate.managed"
LABEL_MODEL = "sparkgate.model"
LABEL_HASH = "sparkgate.spec-hash"
LABEL_PORT = "sparkgate.host-port"
LABEL_NODE = "sparkgate.node"
LABEL_INSTANCE = "sparkgate.instance"  # which gateway owns it: gateways sharing a daemon leave each other alone
LABEL_PART = "sparkgate.part"  # a model spanning nodes: this container's role (head, worker-1, ...)
LABEL_GROUP_SIZE = "sparkgate.group-size"  # ... and how many parts the group has
LABEL_GROUP_NODES = "sparkgate.group-nodes"  # ... and on which nodes, head first ("spark1,spark2")
LABEL_RENDEZVOUS = "sparkgate.rendezvous-port"  # ... and where its parts meet on the head (Ray GCS, SGLang dist-init)
# Whether the engine sleeps, for engines that can't tell themselves (SGLang), kept in the container for the next
# gateway (labels can't change after creation). /tmp is in every image the engines ship in.
NOTE_DIR = "/tmp"
NOTE_NAME = ".sparkgate-sleep.json"


def container_name(model: str, instance: str = "default") -> str:
    """`sparkgate-<model, made a valid name>-<8 hex digits>`. The digits hash the exact model name and the gateway
    instance: model names that read alike once made valid (`Qwen/Qwen3-4B`, `Qwen:Qwen3-4B`, `Qwen-Qwen3-4B`) and
    gateways sharing a daemon each get their own name (Docker refuses a name in use with a 409). Always a valid
    Docker name, `[a-zA-Z0-9][a-zA-Z0-9_.-]+`. Only new containers are named so: a gateway finds its containers
    by their labels, whatever their names (those of earlier versions too)."""
    digest = hashlib.sha256(f"{instance}\0{model}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-zA-Z0-9_.-]", "-", model)[:48]
    return f"sparkgate-{readable}-{digest}"


class DockerHandle:
    """One container (the EngineHandle and ContainerEngine protocols). `keep`: a stop leaves it stopped instead
    of removing it (`keep_container`: a faster next start)."""

    def __init__(self, node: DockerHost, container: Container, root_url: str, keep: bool) -> None:
        self._node = node
        self._container = container
        self._url = root_url
        self._keep = keep
        self._exit: Exit | None = None

    def keeping(self, keep: bool) -> "DockerHandle":
        """The same container, with a stop that keeps it (or removes it) as `keep` says."""
        return DockerHandle(self._node, self._container, self._url, keep)

    @property
    def ident(self) -> str:
        return f"container {self._container.short_id}"

    @property
    def name(self) -> str:
        """The container's name (its id when Docker gave none)."""
        return str(self._container.name or self._container.id)

    @property
    def container_id(self) -> str:
        return str(self._container.id)

    @property
    def host(self) -> DockerHost:
        """The Docker host it runs on."""
        return self._node

    @property
    def root_url(self) -> str:
        return self._url

    @property
    def api_base(self) -> str:
        return self._url + "/v1"

    @property
    def exit_code(self) -> int | None:
        return self._exit.code if self._exit else None

    async def wait_exit(self) -> Exit:
        container = self._container

        def wait(client: docker.DockerClient) -> Exit:
            while True:
                try:
                    # Long-poll; the read timeout only bounds one poll, the loop keeps waiting.
                    status = client.api.wait(container.id, timeout=3600)
                    break
                except requests.exceptions.ReadTimeout:
                    continue
                except docker.errors.NotFound:
                    return Exit(-1)  # removed under us: it is gone either way
            state = client.api.inspect_container(container.id)["State"]
            return Exit(int(status.get("StatusCode", -1)), bool(state.get("OOMKilled")))

        pause = 0.5
        while True:
            try:
                self._exit = await self._node.call(wait, long_poll=True)
                return self._exit
            except RuntimeUnavailable:
                # The daemon went away (restart, network blip) but the engine may well still be
                # serving on its port: keep watching once the daemon is back, don't fail the model.
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)

    async def stop(self, grace: float) -> int | None:
        container_id = self._container.id
        keep = self._keep

        def stop(client: docker.DockerClient) -> int | None:
            try:
                client.api.stop(container_id, timeout=max(0, math.ceil(grace)))
                code = client.api.inspect_container(container_id)["State"].get("ExitCode")
                if not keep:
                    remove_container(client, container_id)
                return code
            except docker.errors.NotFound:
                return None

        return await self._node.call(stop)

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        if lines <= 0:
            return ()
        container_id = self._container.id

        def logs(client: docker.DockerClient) -> bytes:
            try:
                return client.api.logs(container_id, stdout=True, stderr=True, tail=lines)
            except docker.errors.NotFound:
                return b""

        raw = await self._node.call(logs)
        return tuple(raw.decode(errors="replace").splitlines()[-lines:])

    async def note_asleep(self, asleep: bool) -> None:
        """SleepNotes: write the note into the container (`put_archive`: no shell needed in the image)."""
        container_id = self.container_id

        def write(client: docker.DockerClient) -> None:
            started = client.api.inspect_container(container_id)["State"].get("StartedAt", "")
            note = json.dumps({"asleep": asleep, "started_at": started}).encode()
            if not client.api.put_archive(container_id, NOTE_DIR, _tar_of(NOTE_NAME, note)):
                raise RuntimeError(f"Docker did not write {NOTE_DIR}/{NOTE_NAME} into container {container_id[:12]}")

        await self._node.call(write)

    async def container_memory(self, with_pids: bool) -> ContainerMemory:
        """Its memory cgroup (and, with `with_pids`, its host pids while it runs), read in the runtime's pool so
        a slow daemon never holds the event loop."""
        container_id = self.container_id

        def read(client: docker.DockerClient) -> ContainerMemory:
            used = container_memory(client, container_id)
            pids = tuple(container_pids(client, container_id)) if with_pids and used is not None else ()
            return ContainerMemory(used, pids)

        return await self._node.call(read)


def read_sleep_note(client: docker.DockerClient, container: Container) -> bool | None:
    """The container's sleep note (`DockerHandle.note_asleep`), if it was written during its current run (a kept
    container started again begins awake, whatever its file system remembers); None without one."""
    try:
        stream, _ = client.api.get_archive(container.id, f"{NOTE_DIR}/{NOTE_NAME}")
        raw = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = tar.extractfile(NOTE_NAME)
            note = json.loads(member.read()) if member is not None else None
    except (docker.errors.NotFound, docker.errors.APIError, tarfile.TarError, KeyError, ValueError):
        return None
    if not isinstance(note, dict) or not isinstance(note.get("asleep"), bool):
        return None
    started = container.attrs.get("State", {}).get("StartedAt")
    return note["asleep"] if note.get("started_at") == started else None


def _tar_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def container_config(spec: ModelSpec, engine: Engine, node: DockerNode, port: int, spec_hash: str) -> dict[str, Any]:
    """The SDK's `containers.create` arguments for `spec` (pure: unit-tested without a daemon).

    `port` is where the engine is reached on the node: the published port on a bridge or named
    network (the engine listens on `container_port` inside), or the engine's own port with
    `network: host`.
    """
    host_network = spec.network == "host"
    launch = Launch(host=spec.host, port=port) if host_network else Launch(host="0.0.0.0", port=spec.container_port)
    argv = engine.argv(spec, launch)
    config: dict[str, Any] = {
        # The whole command line is ours: the image's entrypoint is replaced, so the same spec works
        # whether the image starts with `vllm serve`, a shell script or nothing.
        "entrypoint": argv[:1],
        "command": argv[1:],
        "environment": dict(spec.env),
        "labels": {LABEL_MANAGED: "true", LABEL_MODEL: spec.name, LABEL_HASH: spec_hash,
                   LABEL_PORT: str(port), LABEL_NODE: node.name},
        **resources(spec),
    }
    if host_network:
        config["network_mode"] = "host"
    else:
        if spec.network:
            config["network"] = spec.network
        config["ports"] = {f"{spec.container_port}/tcp": (node.publish_ip, port)}
    return config


def resources(spec: ModelSpec) -> dict[str, Any]:
    """The `containers.create` arguments every container of `spec` gets: restart policy, volumes, GPUs,
    shm, IPC, memory cap, ulimits, init."""
    config: dict[str, Any] = {
        "restart_policy": {"Name": "no"},  # the waker decides restarts, with backoff
        "volumes": [_expand_volume(v) for v in spec.volumes],
    }
    if spec.init:
        config["init"] = True
    if spec.gpus is not None:
        config["device_requests"] = [_gpu_request(spec.gpus)]
    if spec.shm_size:
        config["shm_size"] = spec.shm_size
    if spec.ipc:
        config["ipc_mode"] = spec.ipc
    if spec.mem_limit:
        config["mem_limit"] = spec.mem_limit
    if spec.ulimits:
        config["ulimits"] = [_ulimit(k, v) for k, v in spec.ulimits.items()]
    return config


def remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Remove a container, also when a removal of it is already under way (then wait for that)."""
    try:
        client.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise
        try:
            client.api.wait(container_id, condition="removed", timeout=60)
        except docker.errors.NotFound:
            pass


def container_memory(client: docker.DockerClient, container_id: str) -> int | None:
    """The container's memory cgroup usage in bytes, without its reclaimable file cache; None when it isn't running.

    The daemon's ``memory_stats`` come from the cgroup:

    * cgroup v1: ``usage`` is ``memory.usage_in_bytes`` (anonymous memory *and* page cache, also the cache of model
      files the engine read); ``stats.total_inactive_file`` is the part of that cache the kernel reclaims first.
    * cgroup v2: ``usage`` is ``memory.current``; ``stats.inactive_file`` is the same reclaimable part.

    Subtracting inactive file pages is what ``docker stats`` shows (docker/cli ``calculateMemUsageUnixNoCache``): a
    container that has just read 60 GB of weights through the page cache does not hold 60 GB more than it needs,
    while active file pages (weights mmapped and in use, as llama.cpp does) stay counted. Daemons before 19.03 had
    no inactive_file; then the whole ``cache`` is subtracted, as their ``docker stats`` did.

    ``one_shot`` (API 1.41+) skips the daemon's second sample for CPU figures, which would cost a second per call.
    """
    try:
        stats = client.api.stats(container_id, stream=False, one_shot=True)
    except docker.errors.InvalidVersion:  # daemon older than API 1.41: ask the slow way
        stats = client.api.stats(container_id, stream=False)
    return memory_from_stats(stats.get("memory_stats") or {})


def memory_from_stats(memory_stats: dict[str, Any]) -> int | None:
    """Usage minus reclaimable file cache, from a Docker stats ``memory_stats`` object (see :func:`container_memory`).
    An empty object (container not running) gives None."""
    usage = memory_stats.get("usage")
    if usage is None:
        return None
    detail = memory_stats.get("stats") or {}
    for key in ("total_inactive_file", "inactive_file", "cache"):  # cgroup v1, cgroup v2, daemons before 19.03
        value = detail.get(key)
        if value is not None and value < usage:
            return int(usage - value)
    return int(usage)


def container_pids(client: docker.DockerClient, container_id: str) -> list[int]:
    """The host pids of a container's processes (``docker top``), to find them in NVML's per-process list.

    Meaningful only where the daemon runs on this machine: NVML reports this machine's pids.
    """
    top = client.api.top(container_id)
    titles = top.get("Titles") or []
    if "PID" not in titles:
        return []
    column = titles.index("PID")
    pids = []
    for row in top.get("Processes") or []:
        try:
            pids.append(int(row[column]))
        except (IndexError, ValueError):
            continue
    return pids


def _expand_volume(volume: str) -> str:
    host, _, rest = volume.partition(":")
    return f"{Path(host).expanduser()}:{rest}"


def _gpu_request(gpus: object) -> DeviceRequest:
    if gpus == "all":
        return DeviceRequest(count=-1, capabilities=[["gpu"]])
    if isinstance(gpus, int):
        return DeviceRequest(count=gpus, capabilities=[["gpu"]])
    return DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])  # type: ignore[union-attr]


def _ulimit(name: str, value: int | UlimitRange) -> Ulimit:
    if isinstance(value, UlimitRange):
        return Ulimit(name=name, soft=value.soft, hard=value.hard)
    return Ulimit(name=name, soft=value, hard=value)


__all__ = [
    "LABEL_GROUP_NODES", "LABEL_GROUP_SIZE", "LABEL_HASH", "LABEL_INSTANCE", "LABEL_MANAGED", "LABEL_MODEL",
    "LABEL_NODE", "LABEL_PART", "LABEL_PORT", "LABEL_RENDEZVOUS", "DockerHandle", "container_config",
    "container_memory", "container_name", "container_pids", "memory_from_stats", "remove_container", "resources",
]
