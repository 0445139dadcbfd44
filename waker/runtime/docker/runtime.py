"""Engines in Docker containers, driven through the Docker SDK (never the docker CLI).

Containers carry labels that mark them as ours (model name, spec hash, published port), so a
restarted gateway finds and adopts them instead of restarting engines. The restart policy is
always "no": the waker decides restarts (with backoff), not the daemon.
"""

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors
from docker.models.containers import Container

from waker.config.spec import ModelSpec
from waker.engines.base import Engine
from waker.runtime.base import Found, RuntimeUnavailable, free_port, http_url, run_to_end
from waker.runtime.docker.container import (
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_PART,
    LABEL_PORT,
    DockerHandle,
    container_config,
    container_name,
    read_sleep_note,
    remove_container,
)
from waker.runtime.docker.group import GroupHandle, PortFree, Rendezvous, discover_groups, ports_free, start_group
from waker.runtime.docker.host import DockerHost, DockerNode

log = logging.getLogger("sparkgate.docker")


PORT_ATTEMPTS = 3


def _port_taken(exc: docker.errors.APIError) -> bool:
    text = str(exc.explanation or exc).lower()
    return "port is already allocated" in text or "address already in use" in text


class DockerRuntime:
    """Creates, starts, stops, removes and rediscovers engine containers on one or more nodes."""

    detached = True  # containers outlive the gateway and are adopted by the next one

    def __init__(self, nodes: Mapping[str, DockerNode] | None = None, max_threads: int = 64,
                 instance: str = "default", pick_port: Callable[[str], int] = free_port,
                 rendezvous_free: PortFree = ports_free) -> None:
        self.instance = instance
        self._pick_port = pick_port  # a free port on an address (injectable: a port taken between pick and use)
        # Where the parts of each group start meet on its head (injectable: how a node is asked whether ports are free)
        self._rendezvous = Rendezvous(rendezvous_free)
        # Blocking SDK calls (including one long-poll `wait` per running container) get their own
        # threads, so they never starve the loop's default executor.
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="docker")
        nodes = nodes or {"local": DockerNode()}
        self._nodes = {name: DockerHost(node, self._pool) for name, node in nodes.items()}

    def node(self, name: str) -> DockerHost:
        try:
            return self._nodes[name]
        except KeyError:
            raise ValueError(f"unknown node {name!r} (configured: {', '.join(self._nodes)})") from None

    async def start(self, spec: ModelSpec, engine: Engine) -> DockerHandle | GroupHandle:
        if spec.nodes > 1:
            # One container per node in spec.placed_on, head first (waker.runtime.docker.group).
            return await start_group(spec, engine, self._nodes, self.instance, self._rendezvous)
        node = self.node(spec.home or next(iter(self._nodes)))
        spec_hash = spec.spec_hash()
        name = container_name(spec.name, self.instance)

        def launch(client: docker.DockerClient) -> tuple[Container, int]:
            reusable: Container | None = None
            mine = [f"{LABEL_MODEL}={spec.name}", f"{LABEL_INSTANCE}={self.instance}"]
            for old in client.containers.list(all=True, filters={"label": mine}, ignore_removed=True):
                labels = old.labels
                if labels.get(LABEL_HASH) == spec_hash and old.status == "running":
                    return old, int(labels[LABEL_PORT])  # already running (started elsewhere): use it
                if labels.get(LABEL_HASH) == spec_hash and spec.keep_container and reusable is None:
                    reusable = old
                    continue
                log.info("removing container %s of %s: %s", old.short_id, spec.name,
                         "spec changed" if labels.get(LABEL_HASH) != spec_hash else "not kept")
                remove_container(client, old.id)
            if reusable is not None:
                try:
                    reusable.start()
                    return reusable, int(reusable.labels[LABEL_PORT])
                except docker.errors.APIError as exc:  # e.g. its port is taken now: start afresh
                    log.info("kept container %s of %s did not start (%s); recreating", reusable.short_id,
                             spec.name, exc)
                    remove_container(client, reusable.id)
            return self._create(client, node.node, spec, engine, name, spec_hash, self.instance, self._pick_port)

        launching = asyncio.ensure_future(node.call(launch))
        try:
            container, port = await asyncio.shield(launching)
        except asyncio.CancelledError:
            # Cancelled while Docker creates or starts the container (the call runs on in its thread): let it
            # finish, then stop what it made or started, so no container runs that nobody tracks
            # (tests/docker/test_docker_cancel.py).
            await run_to_end(self._undo(node, launching, spec))
            raise
        except docker.errors.ImageNotFound:
            raise RuntimeError(
                f"image {spec.image!r} is not on {node.node.describe()}: pull or build it there first"
            ) from None
        except docker.errors.APIError as exc:
            raise RuntimeError(f"Docker refused to run {spec.name}: {exc.explanation or exc}") from None
        return DockerHandle(node, container, http_url(node.node.address, port), spec.keep_container)

    @staticmethod
    async def _undo(node: DockerHost, launching: "asyncio.Future[tuple[Container, int]]", spec: ModelSpec) -> None:
        """Stop what a cancelled start launched: removed, or (keep_container) left stopped for the next start."""
        try:
            container, _ = await launching
        except (Exception, asyncio.CancelledError):  # it made nothing (refused, daemon gone, pool closed)
            return
        log.info("start of %s cancelled: stopping container %s", spec.name, container.short_id)
        try:
            await DockerHandle(node, container, "", spec.keep_container).stop(0)
        except Exception as exc:
            log.warning("could not stop container %s of %s after its start was cancelled (%s); the model's next "
                        "start removes it", container.short_id, spec.name, exc)

    @staticmethod
    def _create(client: docker.DockerClient, node: DockerNode, spec: ModelSpec, engine: Engine, name: str,
                spec_hash: str, instance: str, pick_port: Callable[[str], int] = free_port) -> tuple[Container, int]:
        """Create and start the container. A port picked free may be taken before Docker publishes it (check, then
        use): Docker then refuses the start ("port is already allocated"), and the container is made again on
        another port, up to PORT_ATTEMPTS times. A port the model names is never replaced."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if spec.network == "host":
                port = spec.port or pick_port("127.0.0.1")
            else:
                port = spec.port or pick_port(node.publish_ip if node.publish_ip != "0.0.0.0" else "127.0.0.1")
            kwargs = container_config(spec, engine, node, port, spec_hash)
            kwargs["labels"][LABEL_INSTANCE] = instance
            container = client.containers.create(spec.image, name=name, detach=True, **kwargs)
            try:
                container.start()
            except docker.errors.APIError as exc:
                container.remove(force=True)
                if spec.port is not None or attempt == PORT_ATTEMPTS or not _port_taken(exc):
                    raise
                log.info("port %d for %s was taken before Docker published it; picking another", port, spec.name)
                continue
            return container, port
        raise AssertionError("unreachable")

    async def discover(self) -> list[Found]:
        """Every container of ours on every reachable node; unreachable nodes are logged and skipped. A container
        removed while we look is left out (never an error: a boot must not fail on it).

        The parts of a model spanning nodes are reported together, as one engine, by the rule of
        group.discover_groups (which also decides what a group with a part on an unreachable node is).
        """
        found: list[Found] = []
        parts: list[tuple[DockerHost, Container]] = []
        listed: set[str] = set()
        for node in self._nodes.values():
            try:
                containers, notes = await node.call(self._list)
            except (RuntimeUnavailable, docker.errors.APIError) as exc:
                log.warning("cannot look for running engines on %s: %s", node.node.describe(), exc)
                continue
            listed.add(node.node.name)
            for c in containers:
                if c.labels.get(LABEL_NODE, node.node.name) != node.node.name:
                    continue
                if LABEL_PART in c.labels:
                    parts.append((node, c))
                    continue
                port = int(c.labels.get(LABEL_PORT, "0"))
                # A stopped container we find was kept on purpose; a running one is kept or not as its spec says,
                # which only the waker knows: it adopts it through claim().
                keep = c.status != "running"
                handle = DockerHandle(node, c, http_url(node.node.address, port), keep)
                found.append(Found(c.labels.get(LABEL_MODEL, "?"), c.labels.get(LABEL_HASH, ""),
                                   c.status == "running", handle, (node.node.name,), notes.get(c.id)))
        return found + await discover_groups(parts, self._nodes, listed, self.instance)

    def _list(self, client: docker.DockerClient) -> tuple[list[Container], dict[str, bool | None]]:
        """Our containers on one node, and the sleep notes of the running single ones."""
        containers = client.containers.list(
            all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance}"]},
            ignore_removed=True)  # one removed between the listing and its inspection: gone, not an error
        notes = {c.id: read_sleep_note(client, c) for c in containers
                 if c.status == "running" and LABEL_PART not in c.labels}
        return containers, notes

    async def discard(self, found: Found, reason: str) -> None:
        handle = found.handle
        if not isinstance(handle, DockerHandle):  # a group of parts (waker.runtime.docker.group)
            log.info("stopping stale engine %s (%s): %s", handle.ident, found.model, reason)
            await handle.stop(10.0)
            return
        container_id = handle.container_id

        def remove(client: docker.DockerClient) -> None:
            try:
                client.api.stop(container_id, timeout=10)
            except docker.errors.NotFound:
                return
            remove_container(client, container_id)

        log.info("stopping stale container %s (%s): %s", handle.ident, found.model, reason)
        await handle.host.call(remove)

    def claim(self, found: Found, spec: ModelSpec) -> DockerHandle | GroupHandle:
        """`found` adopted as the engine of `spec`: its stop keeps the container when `spec.keep_container` (what
        `discover` made of it could only guess from its state)."""
        if found.model != spec.name:
            raise ValueError(f"{found.handle.ident} runs {found.model!r}, not {spec.name!r}")
        handle = found.handle
        if isinstance(handle, DockerHandle):
            return handle.keeping(spec.keep_container)
        if isinstance(handle, GroupHandle):
            return handle  # the parts of a model spanning nodes are never kept (start_group removes leftovers)
        raise TypeError(f"{handle.ident} is not a Docker engine")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["DockerRuntime"]
