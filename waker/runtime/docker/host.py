"""A Docker host (a node): how to reach its daemon, and every blocking SDK call made off the event loop.

An unreachable daemon is `RuntimeUnavailable` (not the engine's fault), and the client is made again on the
next call, so a daemon that comes back is used again without a gateway restart.
"""

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from waker.runtime.base import RuntimeUnavailable

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

    def is_local(self) -> bool:
        """Whether its daemon runs on this machine (no url nor DOCKER_HOST, or a unix socket): a port free here is
        then free for its containers on the host network (as waker.config.nodes.NodeConfig.is_local)."""
        url = self.url or os.environ.get("DOCKER_HOST")
        return url is None or url.startswith("unix://")


class DockerHost:
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
            raise RuntimeUnavailable(f"Docker on {self.node.describe()} is unreachable: {short_error(exc)}") from exc
        except docker.errors.DockerException as exc:
            if isinstance(exc, docker.errors.APIError | docker.errors.NotFound):
                raise
            self._client = None  # e.g. "Error while fetching server API version": daemon down
            raise RuntimeUnavailable(f"Docker on {self.node.describe()} is unreachable: {short_error(exc)}") from exc


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


def short_error(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"(Connection refused|No such file or directory|Connection aborted|timed out)", text)
    return match.group(1) if match else text[:300]


__all__ = ["DockerHost", "DockerNode", "short_error"]
