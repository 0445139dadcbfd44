"""The protocol every runtime implements; the rest of the waker never knows which one it drives.

Cancel safety: a runtime's `start` and a handle's `stop` may be cancelled at any moment (a stop cancels a start,
a shutdown cancels a stop). Neither may leave an engine running that nobody tracks: what they began is carried
to its end (`run_to_end`) and undone before the cancellation propagates.
"""

import asyncio
import functools
import random
import signal
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from waker.config.spec import ModelSpec
from waker.engines.base import Engine


class RuntimeUnavailable(Exception):
    """The runtime itself can't be reached (e.g. the Docker daemon is down): not the engine's fault."""


@dataclass(frozen=True, slots=True)
class Exit:
    """How an engine ended."""

    code: int
    oom_killed: bool = False
    # Engines of several parts (a model spanning nodes): which one ended, e.g. "worker-1 on node 'b'".
    part: str | None = None

    def describe(self) -> str:
        text = f"code {self.code}"
        if self.code < 0:  # a process killed by a signal
            try:
                text += f" ({signal.Signals(-self.code).name})"
            except ValueError:
                pass
        elif self.code > 128 and self.code - 128 in signal.Signals._value2member_map_:
            text += f" ({signal.Signals(self.code - 128).name})"
        if self.oom_killed:
            text += ", killed for lack of memory (OOM)"
        if self.part:
            text += f" in {self.part}"
        return text


class EngineHandle(Protocol):
    """One running (or exited) engine instance."""

    @property
    def ident(self) -> str:
        """Process id or container id, for events and status."""
        ...

    @property
    def root_url(self) -> str:
        """Where the engine answers, without the /v1 prefix, e.g. http://127.0.0.1:8000."""
        ...

    @property
    def api_base(self) -> str:
        """The engine's OpenAI base URL, e.g. http://127.0.0.1:8000/v1."""
        ...

    @property
    def exit_code(self) -> int | None:
        """None while running."""
        ...

    async def wait_exit(self) -> Exit:
        """Returns once the engine has exited (for any reason); raises RuntimeUnavailable when the
        runtime lost track of it."""
        ...

    async def stop(self, grace: float) -> int | None:
        """Ask the engine to stop, force it after `grace` seconds; returns the exit code.

        Cancel-safe: when the awaiting task is cancelled, the engine still ends. A process is killed (its
        whole group) and reaped before the cancellation propagates; a container's stop is one SDK call that
        runs to its end in its thread (a group of containers: every part is stopped before the cancellation
        propagates)."""
        ...

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        """The last `lines` lines the engine printed."""
        ...


class Runtime(Protocol):
    # True when engines outlive the gateway (containers): they are left running at exit and
    # adopted at the next start instead of being restarted.
    detached: bool

    async def start(self, spec: ModelSpec, engine: Engine) -> EngineHandle:
        """Launch the engine for `spec`; returns as soon as it is launched (not ready).

        Cancel-safe: a start cancelled while the runtime creates the engine leaves nothing running; what it
        made or started is stopped (and removed, unless kept on purpose) before the cancellation propagates."""
        ...


@runtime_checkable
class SleepNotes(Protocol):
    """An engine that outlives the gateway and can keep a note of whether it sleeps, for engines that can't tell
    themselves (SGLang has no route for it): the next gateway reads it back in `Found.asleep`."""

    async def note_asleep(self, asleep: bool) -> None:
        """Record it with the engine; raises when it can't be recorded."""
        ...


@dataclass(frozen=True, slots=True)
class Found:
    """An engine found running (or stopped) that this gateway did not start in this life."""

    model: str
    spec_hash: str
    running: bool
    handle: EngineHandle
    nodes: tuple[str, ...] = ()  # where it runs (docker: the node(s)); empty: this machine
    asleep: bool | None = None  # its SleepNotes note, of this run of the engine; None: no note
    # Stopped, whether the next start may start it again (a kept container: left alone for keep_container). False: a
    # stopped one is only ever removed (the parts of an incomplete group of several nodes).
    reusable: bool = True


@runtime_checkable
class Adopter(Protocol):
    """A runtime whose engines can be found again after a gateway restart."""

    async def discover(self) -> list[Found]:
        """Every engine of ours the runtime knows of."""
        ...

    async def discard(self, found: Found, reason: str) -> None:
        """Stop and remove a stale engine."""
        ...

    def claim(self, found: Found, spec: ModelSpec) -> EngineHandle:
        """The handle to adopt `found` with as the engine of `spec`, configured for `spec` (docker: a stop keeps
        the container when `spec.keep_container`; a handle made by `discover` can't know that)."""
        ...


@runtime_checkable
class ProcessGroupEngine(Protocol):
    """An engine that is a process group on this machine (its workers inherit the group): stats read its memory
    from /proc."""

    @property
    def process_group(self) -> int:
        ...


@dataclass(frozen=True, slots=True)
class ContainerMemory:
    """What a container's memory cgroup holds (bytes, without reclaimable file cache; None when it isn't
    running), and its processes' pids as seen by its host (empty unless asked for)."""

    cgroup_bytes: int | None
    pids: tuple[int, ...] = ()


@runtime_checkable
class ContainerEngine(Protocol):
    """An engine in a container: stats read its memory through the runtime, off the event loop."""

    async def container_memory(self, with_pids: bool) -> ContainerMemory:
        """The cgroup reading, and with `with_pids` the host pids of its processes (meaningful for NVML only
        when the container's host is this machine). Raises RuntimeUnavailable or the runtime's errors when it
        can't be read (the container is gone, the daemon unreachable)."""
        ...


T = TypeVar("T")


async def run_to_end(work: Awaitable[T]) -> T:
    """Await `work` to its end even when the awaiting task is cancelled meanwhile, once or more; then raise that
    cancellation (`work`'s outcome is dropped then), else return its result or raise its error. For clean-up
    that must not be cut short: removing what a cancelled start made, killing and reaping what a cancelled stop
    left running."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if not task.cancelled():  # we were cancelled, not `work`: it goes on to its end
                cancelled = exc
        except BaseException:  # `work`'s own error: raised below by task.result()
            pass
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: dropped on purpose, not "never retrieved"
        raise cancelled
    return task.result()


def connect_host(host: str) -> str:
    """The address to reach an engine that listens on `host` (a wildcard means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the engine binds it a moment later), below the kernel's range of ephemeral
    ports when there is room: a port of that range, free when tested, can be taken as the local port of any outgoing
    connection (a Docker API call, a health check, a client) before the engine binds it, and the engine then fails
    with "address already in use" (seen in a Docker test of two heads starting at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    if low > 2048:
        for _ in range(64):
            port = random.randint(max(1024, low - 16384), low - 1)
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@functools.cache
def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux: net.ipv4.ip_local_port_range), 0 when unknown."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def http_url(host: str, port: int) -> str:
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
