"""The protocol every runtime implements; the rest of the waker never knows which one it drives."""

import socket
from typing import Protocol

from waker.engines.base import Engine
from waker.spec import ModelSpec


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

    async def wait_exit(self) -> int:
        """Returns the exit code once the engine has exited (for any reason)."""
        ...

    async def stop(self, grace: float) -> int | None:
        """Ask the engine to stop, force it after `grace` seconds; returns the exit code."""
        ...

    def log_tail(self, lines: int) -> tuple[str, ...]:
        """The last `lines` lines the engine printed."""
        ...


class Runtime(Protocol):
    async def start(self, spec: ModelSpec, engine: Engine) -> EngineHandle:
        """Launch the engine for `spec`; returns as soon as it is launched (not ready)."""
        ...


def connect_host(host: str) -> str:
    """The address to reach an engine that listens on `host` (a wildcard means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the engine binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_url(host: str, port: int) -> str:
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
