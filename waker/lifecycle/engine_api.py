"""The engine's own HTTP API, as the lifecycle uses it: is it ready yet, put it to sleep or wake it, does it
sleep. What to call comes from the engine's adapter (waker/engines); this module only makes the calls."""

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Protocol

import aiohttp

from waker.engines.base import Call, Readiness


class EngineCallError(Exception):
    """A sleep or wake call answered non-2xx, or could not be made."""


class EngineApi(Protocol):
    async def until_ready(self, root_url: str, check: Readiness, served_name: str) -> None:
        """Returns once the engine is ready; runs until cancelled otherwise (the caller bounds it)."""
        ...

    async def call(self, root_url: str, calls: Sequence[Call], timeout: float) -> None:
        """Make `calls` in order, all of them within `timeout`; EngineCallError on the first that fails (non-2xx, no
        answer, or an answer without what the call expects)."""
        ...

    async def is_sleeping(self, root_url: str, call: Call) -> bool | None:
        """Whether the engine sleeps, by `call` (answering `{"is_sleeping": bool}`); None when it can't tell."""
        ...


class HttpEngineApi:
    """`EngineApi` over one shared aiohttp session. Readiness is polled every `interval`, each probe with its own
    `timeout`, so a hung engine can't stall the loop."""

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
        while not await self.is_ready(root_url, check, served_name):
            await asyncio.sleep(self._interval)

    async def call(self, root_url: str, calls: Sequence[Call], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for call in calls:
            while True:
                try:
                    await self._make(root_url, call, max(0.001, deadline - loop.time()))
                    break
                except EngineCallError:
                    if not call.retry or loop.time() + self._interval >= deadline:
                        raise
                await asyncio.sleep(self._interval)

    async def _make(self, root_url: str, call: Call, timeout: float) -> None:
        try:
            async with self._session.request(call.method, root_url + call.path, json=call.json,
                                             headers=dict(call.headers),
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise EngineCallError(f"{call.method} {call.path} answered {resp.status}: {text[:300]}")
                problem = _answer_problem(call, text)
                if problem is not None:
                    raise EngineCallError(f"{call.method} {call.path} answered 200 but {problem}: {text[:300]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineCallError(f"{call.method} {call.path} failed: {exc or type(exc).__name__}") from exc

    async def is_sleeping(self, root_url: str, call: Call) -> bool | None:
        try:
            async with self._session.request(call.method, root_url + call.path, json=call.json,
                                             timeout=self._timeout) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        answer = body.get("is_sleeping") if isinstance(body, dict) else None
        return answer if isinstance(answer, bool) else None


def _answer_problem(call: Call, text: str) -> str | None:
    """What is wrong with a 2xx answer to `call`, or None."""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("success") is False:
        return "reports no success"
    if call.expect is None:
        return None
    if not isinstance(body, dict):
        return "is not a JSON object"
    if not body.get(call.expect):
        return f"has no {call.expect}"
    return None


__all__ = ["EngineApi", "EngineCallError", "HttpEngineApi"]
