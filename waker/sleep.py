"""Sleep and wake through the engines' own APIs, and the launch flags that enable them.

vLLM (https://docs.vllm.ai/en/latest/features/sleep_mode/): started with `--enable-sleep-mode` and
env `VLLM_SERVER_DEV_MODE=1` (the sleep routes exist only in dev mode). `POST /sleep?level=N`;
level 1 offloads weights to CPU RAM and drops the KV cache, level 2 drops both. Waking from level 1
is `POST /wake_up`; from level 2 the weights must be reloaded in place: `POST /wake_up?tags=weights`,
`POST /collective_rpc {"method": "reload_weights"}`, then `POST /wake_up?tags=kv_cache`.
`GET /is_sleeping` answers `{"is_sleeping": bool}`.

SGLang (python/sglang/srt/entrypoints/http_server.py): started with `--enable-memory-saver`;
`POST /release_memory_occupation` and `POST /resume_memory_occupation`, JSON body `{}` (all tags).
It must only be called on an idle engine (releasing under load aborts the engine): the waker only
puts idle models to sleep.
"""

from dataclasses import dataclass
from typing import Any

import aiohttp

from waker.config.spec import EngineKind, IdleAction, ModelSpec


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    json: dict[str, Any] | None = None


def sleep_calls(spec: ModelSpec) -> tuple[Call, ...]:
    if spec.engine is EngineKind.VLLM:
        return (Call("POST", f"/sleep?level={spec.sleep_level}"),)
    if spec.engine is EngineKind.SGLANG:
        return (Call("POST", "/release_memory_occupation", {}),)
    raise ValueError(f"engine {spec.engine} has no sleep API")


def wake_calls(spec: ModelSpec) -> tuple[Call, ...]:
    if spec.engine is EngineKind.VLLM:
        if spec.sleep_level == 1:
            return (Call("POST", "/wake_up"),)
        return (
            Call("POST", "/wake_up?tags=weights"),
            Call("POST", "/collective_rpc", {"method": "reload_weights"}),
            Call("POST", "/wake_up?tags=kv_cache"),
        )
    if spec.engine is EngineKind.SGLANG:
        return (Call("POST", "/resume_memory_occupation", {}),)
    raise ValueError(f"engine {spec.engine} has no sleep API")


def launch_spec(spec: ModelSpec) -> ModelSpec:
    """The spec as launched: with the flags and environment its sleep mode needs, if any.

    Used for both launching and the spec hash, so an adopted engine is compared like for like.
    """
    if spec.idle_action is not IdleAction.SLEEP:
        return spec
    if spec.engine is EngineKind.VLLM:
        args = spec.args if "--enable-sleep-mode" in spec.args else (*spec.args, "--enable-sleep-mode")
        return spec.model_copy(update={"args": args, "env": {"VLLM_SERVER_DEV_MODE": "1", **spec.env}})
    if spec.engine is EngineKind.SGLANG:
        args = spec.args if "--enable-memory-saver" in spec.args else (*spec.args, "--enable-memory-saver")
        return spec.model_copy(update={"args": args})
    return spec


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
