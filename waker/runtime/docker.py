"""Engines in Docker containers, driven through the Docker SDK (never the docker CLI).

Containers carry labels that mark them as ours (model name, spec hash, published port), so a
restarted gateway finds and adopts them instead of restarting engines. The restart policy is
always "no": the waker decides restarts (with backoff), not the daemon.
"""

import asyncio
import contextlib
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.models.containers import Container
from docker.types import DeviceRequest, Ulimit

from waker.engines.base import Engine, Launch
from waker.runtime.base import Exit, Found, RuntimeUnavailable, free_port, http_url
from waker.spec import ModelSpec, UlimitRange

if TYPE_CHECKING:
    from waker.runtime.group import GroupHandle

log = logging.getLogger("sparkgate.docker")

LABEL_MANAGED = "sparkgate.managed"
LABEL_MODEL = "sparkgate.model"
LABEL_HASH = "sparkgate.spec-hash"
LABEL_PORT = "sparkgate.host-port"
LABEL_NODE = "sparkgate.node"
LABEL_INSTANCE = "sparkgate.instance"  # which gateway owns it: gateways sharing a daemon leave each other alone
LABEL_PART = "sparkgate.part"  # a model spanning nodes: this container's role (head, worker-1, ...)
LABEL_GROUP_SIZE = "sparkgate.group-size"  # ... and how many parts the group has

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DockerNode:
    """A Docker host. `url`: unix://, tcp:// or ssh:// (None: DOCKER_HOST or the local socket).
    `address`: how the gateway reaches engines published there; `publish_ip`: where they listen;
    `cluster_address`: this node's address on the link between nodes (e.g. the QSFP cable between two DGX
    Sparks), which the parts of a model spanning several nodes use to find each other (default: `address`)."""

    name: str = "local"
    url: str | None = None
    address: str = "127.0.0.1"
    publish_ip: str = "127.0.0.1"
    cluster_address: str | None = None

    @property
    def link_address(self) -> str:
        """The address other nodes reach this one at, for the engines' own distributed modes."""
        return self.cluster_address or self.address

    def describe(self) -> str:
        return f"node {self.name!r} ({self.url or 'local socket'})"


def container_name(model: str) -> str:
    return "sparkgate-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", model)


class _Node:
    """One Docker host: its client (made lazily, remade after the daemon was unreachable)."""

    def __init__(self, node: DockerNode, pool: ThreadPoolExecutor) -> None:
        self.node = node
        self._pool = pool
        self._client: docker.DockerClient | None = None

    def _connect(self) -> docker.DockerClient:
        if self._client is None:
            if self.node.url is None:
                self._client = docker.from_env(timeout=30)
            else:
                self._client = docker.DockerClient(
                    base_url=self.node.url, timeout=30, use_ssh_client=self.node.url.startswith("ssh://")
                )
        return self._client

    async def call(self, fn: Callable[[docker.DockerClient], T], *, long_poll: bool = False) -> T:
        """Run a blocking SDK call off the event loop; an unreachable daemon is RuntimeUnavailable.

        `long_poll` calls (waiting for a container to exit: hours) get a daemon thread of their own, so
        they neither hold a pool thread nor keep the process alive when the gateway exits and leaves its
        containers running."""

        def run() -> T:
            return fn(self._connect())

        try:
            if long_poll:
                return await _in_daemon_thread(run)
            return await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.ProtocolError, ConnectionError) as exc:
            self._client = None
            raise RuntimeUnavailable(f"Docker on {self.node.describe()} is unreachable: {_short(exc)}") from exc
        except docker.errors.DockerException as exc:
            if isinstance(exc, docker.errors.APIError | docker.errors.NotFound):
                raise
            self._client = None  # e.g. "Error while fetching server API version": daemon down
            raise RuntimeUnavailable(f"Docker on {self.node.describe()} is unreachable: {_short(exc)}") from exc


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="docker wait", daemon=True).start()
    return await future


def _short(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"(Connection refused|No such file or directory|Connection aborted|timed out)", text)
    return match.group(1) if match else text[:300]


class DockerHandle:
    def __init__(self, node: _Node, container: Container, root_url: str, keep: bool) -> None:
        self._node = node
        self._container = container
        self._url = root_url
        self._keep = keep
        self._exit: Exit | None = None

    @property
    def ident(self) -> str:
        return f"container {self._container.short_id}"

    @property
    def container_id(self) -> str:
        return str(self._container.id)

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
                    _remove(client, container_id)
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


class DockerRuntime:
    """Creates, starts, stops, removes and rediscovers engine containers on one or more nodes."""

    detached = True  # containers outlive the gateway and are adopted by the next one

    def __init__(self, nodes: Mapping[str, DockerNode] | None = None, max_threads: int = 64,
                 instance: str = "default") -> None:
        self.instance = instance
        # Blocking SDK calls (including one long-poll `wait` per running container) get their own
        # threads, so they never starve the loop's default executor.
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="docker")
        nodes = nodes or {"local": DockerNode()}
        self._nodes = {name: _Node(node, self._pool) for name, node in nodes.items()}

    def node(self, name: str) -> _Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise ValueError(f"unknown node {name!r} (configured: {', '.join(self._nodes)})") from None

    async def start(self, spec: ModelSpec, engine: Engine) -> "DockerHandle | GroupHandle":
        if spec.nodes > 1:
            # One container per node in spec.placed_on, head first (waker.runtime.group builds on this module).
            from waker.runtime.group import start_group

            return await start_group(spec, engine, self._nodes, self.instance)
        node = self.node(spec.home or next(iter(self._nodes)))
        spec_hash = spec.spec_hash()
        name = container_name(spec.name)

        def launch(client: docker.DockerClient) -> tuple[Container, int]:
            reusable: Container | None = None
            mine = [f"{LABEL_MODEL}={spec.name}", f"{LABEL_INSTANCE}={self.instance}"]
            for old in client.containers.list(all=True, filters={"label": mine}):
                labels = old.labels
                if labels.get(LABEL_HASH) == spec_hash and old.status == "running":
                    return old, int(labels[LABEL_PORT])  # already running (started elsewhere): use it
                if labels.get(LABEL_HASH) == spec_hash and spec.keep_container and reusable is None:
                    reusable = old
                    continue
                log.info("removing container %s of %s: %s", old.short_id, spec.name,
                         "spec changed" if labels.get(LABEL_HASH) != spec_hash else "not kept")
                _remove(client, old.id)
            if reusable is not None:
                try:
                    reusable.start()
                    return reusable, int(reusable.labels[LABEL_PORT])
                except docker.errors.APIError as exc:  # e.g. its port is taken now: start afresh
                    log.info("kept container %s of %s did not start (%s); recreating", reusable.short_id,
                             spec.name, exc)
                    _remove(client, reusable.id)
            return self._create(client, node.node, spec, engine, name, spec_hash, self.instance)

        try:
            container, port = await node.call(launch)
        except docker.errors.ImageNotFound:
            raise RuntimeError(
                f"image {spec.image!r} is not on {node.node.describe()}: pull or build it there first"
            ) from None
        except docker.errors.APIError as exc:
            raise RuntimeError(f"Docker refused to run {spec.name}: {exc.explanation or exc}") from None
        return DockerHandle(node, container, http_url(node.node.address, port), spec.keep_container)

    @staticmethod
    def _create(client: docker.DockerClient, node: DockerNode, spec: ModelSpec, engine: Engine, name: str,
                spec_hash: str, instance: str) -> tuple[Container, int]:
        if spec.network == "host":
            port = spec.port or free_port()
        else:
            port = spec.port or free_port(node.publish_ip if node.publish_ip != "0.0.0.0" else "127.0.0.1")
        kwargs = container_config(spec, engine, node, port, spec_hash)
        kwargs["labels"][LABEL_INSTANCE] = instance
        container = client.containers.create(spec.image, name=name, detach=True, **kwargs)
        try:
            container.start()
        except docker.errors.APIError:
            container.remove(force=True)
            raise
        return container, port

    async def discover(self) -> list[Found]:
        """Every container of ours on every reachable node; unreachable nodes are logged and skipped.

        The parts of a model spanning nodes are reported together, as one engine (see group.discover_groups).
        """
        from waker.runtime.group import discover_groups

        found: list[Found] = []
        parts: list[tuple[_Node, Container]] = []
        for node in self._nodes.values():
            try:
                containers = await node.call(
                    lambda client: client.containers.list(
                        all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance}"]}))
            except RuntimeUnavailable as exc:
                log.warning("cannot look for running engines: %s", exc)
                continue
            for c in containers:
                if c.labels.get(LABEL_NODE, node.node.name) != node.node.name:
                    continue
                if LABEL_PART in c.labels:
                    parts.append((node, c))
                    continue
                port = int(c.labels.get(LABEL_PORT, "0"))
                keep = c.status != "running"  # a stopped container we find was kept on purpose
                handle = DockerHandle(node, c, http_url(node.node.address, port), keep)
                found.append(Found(c.labels.get(LABEL_MODEL, "?"), c.labels.get(LABEL_HASH, ""),
                                   c.status == "running", handle, (node.node.name,)))
        return found + await discover_groups(parts)

    async def discard(self, found: Found, reason: str) -> None:
        handle = found.handle
        if not isinstance(handle, DockerHandle):  # a group of parts (waker.runtime.group)
            log.info("stopping stale engine %s (%s): %s", handle.ident, found.model, reason)
            await handle.stop(10.0)
            return
        assert isinstance(handle, DockerHandle)
        container_id = handle.container_id

        def remove(client: docker.DockerClient) -> None:
            try:
                client.api.stop(container_id, timeout=10)
            except docker.errors.NotFound:
                return
            _remove(client, container_id)

        log.info("stopping stale container %s (%s): %s", handle.ident, found.model, reason)
        await handle._node.call(remove)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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


def _remove(client: docker.DockerClient, container_id: str) -> None:
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


__all__ = ["DockerHandle", "DockerNode", "DockerRuntime", "container_name"]
