"""An always-on endpoint the waker does not manage: a remote server, or one run by hand."""

import asyncio

from waker.config.spec import ModelSpec
from waker.engines.base import Engine
from waker.runtime.base import Exit


class ExternalHandle:
    def __init__(self, url: str) -> None:
        self._api_base = url.rstrip("/")
        self._root = self._api_base.removesuffix("/v1")
        self._never = asyncio.Event()

    @property
    def ident(self) -> str:
        return self._api_base

    @property
    def root_url(self) -> str:
        return self._root

    @property
    def api_base(self) -> str:
        return self._api_base

    @property
    def exit_code(self) -> int | None:
        return None

    async def wait_exit(self) -> Exit:
        await self._never.wait()  # an external endpoint never "exits" from our point of view
        return Exit(0)

    async def stop(self, grace: float) -> int | None:
        return None

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        return ()


class ExternalRuntime:
    detached = True
    async def start(self, spec: ModelSpec, engine: Engine) -> ExternalHandle:
        assert spec.url is not None  # guaranteed by ModelSpec validation
        return ExternalHandle(spec.url)
