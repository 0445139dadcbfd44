"""Readiness probing: is the engine answering yet?"""

import asyncio
import contextlib
from typing import Protocol

import aiohttp

from waker.engines.base import Readiness


class Prober(Protocol):
    async def until_ready(self, root_url: str, check: Readiness, served_name: str) -> None:
        """Returns once the engine is ready; runs until cancelled otherwise."""
        ...


class ReadinessProber:
    """Polls an engine until it is ready; each probe has its own short timeout."""

    def __init__(self, session: aiohttp.ClientSession, interval: float, timeout: float) -> None:
        self._session = session
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def is_ready(self, root_url: str, check: Readiness, served_name: str) -> bool:
        try:
            async with self._session.get(root_url + check.path, timeout=self._timeout) as resp:
                if resp.status != 200:
                    return False
                if not check.expect_model:
                    return True
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        with contextlib.suppress(AttributeError, TypeError):
            return any(item.get("id") == served_name for item in body.get("data", []))
        return False

    async def until_ready(self, root_url: str, check: Readiness, served_name: str) -> None:
        """Returns once ready; runs until cancelled otherwise (the caller bounds it)."""
        while not await self.is_ready(root_url, check, served_name):
            await asyncio.sleep(self._interval)
