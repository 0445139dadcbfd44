"""Helpers shared by the client-pattern tests."""

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from tests.harness import Gateway


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll state the gateway exposes no event for (a counter going back to 0), bounded."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for: {what}") from None


async def engine_stats(gw: Gateway, model: str) -> dict[str, Any]:
    """The fake engine's own counters (GET /stats), read directly from the engine."""
    handle = gw.waker.controller(model).handle
    assert handle is not None, f"{model} is not running"
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(handle.root_url + "/stats")).json()


async def settled_engine_stats(gw: Gateway, model: str, timeout: float = 10) -> dict[str, Any]:
    """/stats once every stream the engine started has ended (completed or cancelled)."""
    async with asyncio.timeout(timeout):
        while True:
            stats = await engine_stats(gw, model)
            if stats["streams_started"] == stats["streams_completed"] + stats["streams_cancelled"]:
                return stats
            await asyncio.sleep(0.02)


async def requests_total(gw: Gateway, status: str, model: str | None = None) -> float:
    """The sum of sparkgate_requests_total for one final status (and model) from /metrics."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(gw.url + "/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("sparkgate_requests_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        if f'status="{status}"' in labels and (model is None or f'model="{model}"' in labels):
            total += float(value)
    return total


def sse_events(raw: bytes) -> list[str]:
    """The SSE events of a body, comments included, in order (each without its trailing blank line)."""
    return [event for event in raw.decode().split("\n\n") if event]


def data_payloads(raw: bytes) -> list[Any]:
    """The JSON of every `data:` event, `[DONE]` kept as the string."""
    out: list[Any] = []
    for event in sse_events(raw):
        if event.startswith("data: "):
            data = event[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
