"""Live memory of a node reached through its Docker daemon (another DGX Spark): no agent on the node.

A remote node's ``/proc/meminfo`` is read through the Docker API it already serves: containers share the host's
kernel and see the host's ``/proc/meminfo`` (unless LXCFS is mounted over it), so

1. ``cat /proc/meminfo`` is exec'd in a running container of ours there (label ``sparkgate.managed=true``; any
   gateway's: the figure is the node's, not the container's); else
2. a throwaway container runs ``cat /proc/meminfo`` (auto-removed, no network, read-only root) from an image already
   on the node: ours first (engine images have ``cat``), then any other, smallest first; at most every
   ``run_every`` seconds, because creating a container is far heavier than an exec; else
3. the reading is unknown (None) and the scheduler relies on its ledger.

``MemAvailable`` is the free figure, as for this machine (see :class:`waker.runtime.memory.MemInfoProbe` for why), and
the right one on unified memory (GB10). The total is the daemon's ``info()["MemTotal"]`` (the same number in bytes).
A remote node with discrete GPUs would need NVML's figures instead (system RAM says nothing about the
cards): not read here.

The :class:`~waker.scheduling.budget.MemoryProbe` interface is synchronous and asked on every admission step, while
a read through a remote daemon takes milliseconds to seconds (ssh). So :class:`DockerMemoryProbe` serves the last
reading and a daemon thread of its own refreshes it every ``interval``: the event loop never waits for Docker, and a
hung daemon only hangs that thread. A reading older than ``max_age`` is unknown, so a node that went dark never reports
free memory it may no longer have.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from waker.clock import Clock, SystemClock
from waker.runtime.docker.container import LABEL_MANAGED
from waker.runtime.memory import GIB, meminfo_gb

log = logging.getLogger("sparkgate.memory")

T = TypeVar("T")

LABEL_MEMORY_PROBE = "sparkgate.memory-probe"
"""Marks throwaway containers. Not ``sparkgate.managed``: those are engines, and a gateway would try to adopt it."""

_MEMINFO = ["cat", "/proc/meminfo"]
_MAX_IMAGES_PER_RUN = 3  # images tried per throwaway round: a node with 100 images without `cat` is not combed at once


class NodeUnreachable(Exception):
    """The node's Docker daemon can't be reached (down, network, ssh)."""


class MemInfoSource(Protocol):
    """Where :class:`DockerMemoryProbe` gets its figures; blocking calls, made in the probe's own thread."""

    def total_bytes(self) -> int | None:
        """The node's total memory in bytes; None if the daemon doesn't say. Raises NodeUnreachable."""
        ...

    def meminfo_by_exec(self) -> str | None:
        """The node's /proc/meminfo through a running container of ours; None if none could. Raises NodeUnreachable."""
        ...

    def meminfo_by_run(self) -> str | None:
        """The node's /proc/meminfo through a throwaway container; None if no image could. Raises NodeUnreachable."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Reading:
    free_gb: float
    at: float  # clock.now() when it was read
    source: str  # "exec" or "run"


class DockerMemoryProbe:
    """Free and total memory of the node behind Docker host ``url`` (``tcp://``, ``ssh://``, ``unix://``).

    ``interval``: seconds between refreshes. ``max_age``: a reading older than this is unknown (default 3 intervals).
    ``run_every``: least seconds between throwaway containers (default 2 intervals, so their readings stay fresh).
    ``source``: what reads the node (default :class:`DockerMemInfo` on ``url``; a fake in tests). ``autostart``: the
    first reading starts the refresher when :meth:`start` wasn't called (that reading is still unknown). ``name``:
    what status pages show (default "docker (url)").

    Lifecycle: :meth:`start` (at boot, so the first admission already has a reading) and :meth:`close` (at shutdown);
    both are cheap, idempotent and don't need an event loop. :meth:`refresh` is one synchronous round (tests call it).
    """

    def __init__(self, url: str | None, *, node: str = "node", interval: float = 5.0, max_age: float | None = None,
                 run_every: float | None = None, clock: Clock | None = None, source: MemInfoSource | None = None,
                 autostart: bool = True, name: str | None = None) -> None:
        if interval <= 0:
            raise ValueError("the memory probe interval must be positive")
        self.name = name or f"docker ({url or 'local socket'})"
        self.node = node
        self.interval = interval
        self.max_age = max_age if max_age is not None else 3 * interval
        self.run_every = run_every if run_every is not None else 2 * interval
        self._clock = clock or SystemClock()
        self._source = source if source is not None else DockerMemInfo(url)
        self._autostart = autostart
        # Written by the refresher thread, read by the event loop: each is replaced whole (atomic), never mutated.
        self._reading: _Reading | None = None
        self._total_gb: float | None = None
        self._last_run: float | None = None
        self._trouble: str | None = None  # what was logged last: logged again only when it changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def free_gb(self) -> float | None:
        self._ensure_started()
        reading = self._reading
        if reading is None or self._clock.now() - reading.at > self.max_age:
            return None
        return reading.free_gb

    def total_gb(self) -> float | None:
        """The node's total once read; kept while the node is unreachable (it doesn't change, unlike free memory)."""
        self._ensure_started()
        return self._total_gb

    @property
    def source(self) -> str | None:
        """How the current reading was made: "exec", "run", or None when there is none."""
        reading = self._reading
        return reading.source if reading is not None else None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._refresh_forever, name=f"memory probe {self.node}",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop refreshing. Doesn't wait: a round in progress (a slow daemon) ends in the thread, which then closes
        the Docker client. Readings are unknown from now on."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        self._reading = None
        if thread is None:
            self._source.close()

    def refresh(self) -> None:
        """One round: read the node, keep the figure. Never raises for a node that is down or unreadable."""
        try:
            if self._total_gb is None:
                total = self._source.total_bytes()
                self._total_gb = total / GIB if total else None
            text, source = self._source.meminfo_by_exec(), "exec"
            if text is None and self._run_due():
                self._last_run = self._clock.now()
                text, source = self._source.meminfo_by_run(), "run"
        except NodeUnreachable as exc:
            self._reading = None  # a dead node has no free memory to offer, not its last figure
            self._trouble_is(f"memory of node {self.node!r} unknown: {exc}")
            return
        if text is None:
            if source == "run":  # nothing could read it; an exec-less round between runs keeps the last reading
                self._trouble_is(f"memory of node {self.node!r} unknown: no container of ours runs there and no "
                                 "image there could run `cat /proc/meminfo`")
            return
        free = meminfo_gb(text, "MemAvailable")
        if free is None:
            self._reading = None
            self._trouble_is(f"memory of node {self.node!r} unknown: its /proc/meminfo has no MemAvailable line")
            return
        if self._total_gb is None:
            self._total_gb = meminfo_gb(text, "MemTotal")
        self._reading = _Reading(free, self._clock.now(), source)
        self._trouble_is(None)

    def _run_due(self) -> bool:
        return self._last_run is None or self._clock.now() - self._last_run >= self.run_every

    def _trouble_is(self, trouble: str | None) -> None:
        """Log a problem once, and its end once: a node down for an hour is one line, not 720."""
        if trouble == self._trouble:
            return
        if trouble is not None:
            log.warning("%s", trouble)
        elif self._trouble is not None:
            log.info("memory of node %r readable again", self.node)
        self._trouble = trouble

    def _ensure_started(self) -> None:
        if self._autostart and self._thread is None and not self._stop.is_set():
            self.start()

    def _refresh_forever(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception:  # a bug in one round must not end the readings for good
                    log.exception("memory probe of node %r", self.node)
                if self._stop.wait(self.interval):
                    break
        finally:
            self._reading = None
            self._source.close()


class DockerMemInfo:
    """Reads a node's memory through its Docker daemon at ``url`` (None: DOCKER_HOST or the local socket).

    Blocking; meant for :class:`DockerMemoryProbe`'s thread. ``image`` is tried first for throwaway containers. The
    client is made lazily and remade after the daemon was unreachable (like ``waker.runtime.docker._Node``).
    """

    def __init__(self, url: str | None, *, timeout: float = 10.0, image: str | None = None) -> None:
        self.url = url
        self._timeout = timeout
        self._image = image  # the last image a throwaway container ran from (or the one configured)
        self._unusable: set[str] = set()  # images that couldn't run `cat` (no cat, another platform ...)
        self._client: docker.DockerClient | None = None

    def total_bytes(self) -> int | None:
        info = self._call(lambda api: api.info())
        total = info.get("MemTotal")
        return int(total) if total else None

    def meminfo_by_exec(self) -> str | None:
        running = self._call(lambda api: api.containers(filters={"label": f"{LABEL_MANAGED}=true",
                                                                 "status": "running"}))
        for container in running:
            text = self._call(lambda api, cid=container["Id"]: _exec_meminfo(api, cid))
            if text is not None:
                return text
        return None

    def meminfo_by_run(self) -> str | None:
        for image in self._candidates():
            text = self._call(lambda api, image=image: _run_meminfo(api, image))
            if text is not None:
                self._image = image
                return text
            self._unusable.add(image)
        return None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _candidates(self) -> list[str]:
        """Images to try, best first: the one that worked last, our engines', then the rest, smallest first."""
        ours = self._call(lambda api: api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=true"}))
        images = self._call(lambda api: api.images())
        order = [self._image] if self._image else []
        order += [c["ImageID"] for c in ours if c.get("ImageID")]
        order += [i["Id"] for i in sorted(images, key=lambda i: i.get("Size") or 0)]
        fresh = [image for image in _unique(order) if image not in self._unusable]
        if not fresh and self._unusable:  # all tried: maybe it was the daemon, not the images; go round again
            self._unusable.clear()
        return fresh[:_MAX_IMAGES_PER_RUN]

    def _call(self, fn: Callable[[docker.APIClient], T]) -> T:
        """``fn(low-level API client)``; an unreachable daemon is NodeUnreachable (and the client is remade)."""
        try:
            if self._client is None:
                self._client = docker.DockerClient(base_url=self.url, timeout=self._timeout,
                                                   use_ssh_client=bool(self.url and self.url.startswith("ssh://"))) \
                    if self.url else docker.from_env(timeout=int(self._timeout))
            return fn(self._client.api)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, docker.errors.DockerException,
                OSError) as exc:
            # DockerException includes an APIError on a listing (reads that may fail handle theirs): a daemon that
            # can't list its containers can't be read either.
            self.close()
            raise NodeUnreachable(f"Docker at {self.url or 'local socket'} is unreachable: {_short(exc)}") from exc


def _exec_meminfo(api: docker.APIClient, container_id: str) -> str | None:
    try:
        exec_id = api.exec_create(container_id, _MEMINFO, stdout=True, stderr=False)["Id"]
        output = api.exec_start(exec_id)
        code = api.exec_inspect(exec_id).get("ExitCode")
    except docker.errors.APIError:  # exited or paused since the listing, or no `cat` in that image
        return None
    return _meminfo_text(output) if code == 0 else None


def _run_meminfo(api: docker.APIClient, image: str) -> str | None:
    """``docker run --rm --network none --read-only --entrypoint cat IMAGE /proc/meminfo``, output read by attaching
    before the start (an auto-removed container's logs may be gone by the time we'd ask)."""
    host_config = api.create_host_config(auto_remove=True, network_mode="none", read_only=True,
                                         security_opt=["no-new-privileges"])
    try:
        container_id = api.create_container(
            image, entrypoint=_MEMINFO[:1], command=_MEMINFO[1:], labels={LABEL_MEMORY_PROBE: "true"},
            name=f"sparkgate-meminfo-{uuid.uuid4().hex[:8]}", host_config=host_config, network_disabled=True,
        )["Id"]
    except docker.errors.APIError:  # e.g. removed since it was listed
        return None
    try:
        stream = api.attach(container_id, stdout=True, stderr=False, stream=True, logs=True)
        api.start(container_id)
        output = b"".join(_chunks(stream))
    except docker.errors.APIError:  # `cat` not in the image, another platform ...
        return None
    finally:
        try:
            api.remove_container(container_id, force=True)
        except docker.errors.APIError:  # already gone (auto-removed) or being removed: as wanted
            pass
    return _meminfo_text(output)


def _chunks(stream: Iterator[bytes] | bytes) -> Iterator[bytes]:
    if isinstance(stream, bytes):
        yield stream
    else:
        yield from stream


def _meminfo_text(output: bytes | None) -> str | None:
    text = (output or b"").decode("utf-8", "replace")
    return text if "MemTotal:" in text else None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "No such file or directory", "timed out", "Name or service not known"):
        if marker in text:
            return marker
    return text[:300]
