"""Sleep and wake through the engines' own APIs: a shim while callers move to the engine adapters.

The facts (launch flags, sleep and wake calls) now live in each adapter (waker/engines/vllm.py,
waker/engines/sglang.py); these functions only look the adapter up. `SleepError` and `call_engine` (the
HTTP side) stay here until they move to waker/lifecycle/engine_api.py, then this module goes.
"""

import aiohttp

from waker.config.spec import ModelSpec
from waker.engines.base import Call
from waker.engines.registry import engine_for

__all__ = ["Call", "SleepError", "call_engine", "launch_spec", "sleep_calls", "wake_calls"]


def sleep_calls(spec: ModelSpec) -> tuple[Call, ...]:
    return engine_for(spec.engine).sleep_calls(spec)


def wake_calls(spec: ModelSpec) -> tuple[Call, ...]:
    return engine_for(spec.engine).wake_calls(spec)


def launch_spec(spec: ModelSpec) -> ModelSpec:
    """The spec as launched (see Engine.launch_spec)."""
    return engine_for(spec.engine).launch_spec(spec)


class SleepError(Exception):
    pass


async def call_engine(session: aiohttp.ClientSession, root_url: str, calls: tuple[Call, ...], timeout: float) -> None:
    """Run `calls` in order; any non-2xx answer or transport error is a SleepError."""
    limit = aiohttp.ClientTimeout(total=timeout)
    for call in calls:
        try:
            async with session.request(call.method, root_url + call.path, json=call.json, timeout=limit) as resp:
                if resp.status >= 300:
                    body = (await resp.text())[:300]
                    raise SleepError(f"{call.method} {call.path} answered {resp.status}: {body}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SleepError(f"{call.method} {call.path} failed: {exc or type(exc).__name__}") from exc
