"""Sleep mode end to end, per engine: the conformance fakes (tests/fake_engine.py --flavor vllm|sglang) in real
containers, driven through the gateway and the official OpenAI SDK.

Each engine: start -> sleep -> wake -> a generation whose output is the model's real output (a level-2 sleep
discards the weights: a wake that forgets to reload them answers garbage, "!!!!", with a 200); then the gateway
restarts while the engine sleeps, the new one adopts it asleep (vLLM says so at /is_sleeping; SGLang can't, so the
gateway reads the note it left in the container), and a request wakes it and is answered correctly.
"""

from pathlib import Path
from typing import Any

import docker
import httpx
import openai
import pytest

from tests.docker.conftest import IMAGE, TESTS
from tests.harness import run_gateway, write_models
from waker.state import ModelState

pytestmark = pytest.mark.docker

REAL = " t0 t1 t2 t3"  # what the fakes generate for max_tokens 4 while their weights are intact

# The argv the adapters build follows `command`: vLLM's positional model and flags, SGLang's --model-path and flags.
FLAVORS: dict[str, dict[str, Any]] = {
    "vllm": {"engine": "vllm", "model": "/models/tiny"},
    "sglang": {"engine": "sglang", "model": "/models/tiny"},
}
# What each engine's log of sleep calls shows for one sleep and one wake (level 2).
SLEEP_LOG = {
    "vllm": ["sleep level=2 mode=wait", "wake_up tags=weights", "collective_rpc reload_weights",
             "wake_up tags=kv_cache"],
    "sglang": ["flush_cache", "release_memory_occupation tags=weights,kv_cache,cuda_graph",
               "resume_memory_occupation tags=weights,kv_cache,cuda_graph",
               "update_weights_from_disk model_path=/models/tiny"],
}


def sleeping_spec(name: str, flavor: str) -> dict[str, Any]:
    return {
        "name": name, "runtime": "docker", "image": IMAGE, **FLAVORS[flavor],
        "command": ["python3", "/opt/tests/fake_engine.py", "--flavor", flavor],
        "volumes": [f"{TESTS}:/opt/tests:ro"], "network": None,
        "idle_action": "sleep", "sleep_level": 2, "memory_gb": 10, "sleep_memory_gb": 1,
        "start_timeout": "30s", "stop_timeout": "5s", "wake_timeout": "20s", "min_uptime": 0, "idle_timeout": 0,
    }


async def ask(base_url: str, model: str) -> str:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        answer = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=4)
    return answer.choices[0].message.content or ""


async def engine_get(root_url: str, path: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(root_url + path)).json()


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_sleep_wake_and_adoption_asleep_answer_the_models_real_output(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str, flavor: str) -> None:
    models = write_models(tmp_path, sleeping_spec(model_name, flavor))
    async with run_gateway(models) as gw:
        assert await ask(gw.v1, model_name) == REAL
        controller = gw.waker.controller(model_name)
        engine = controller.handle
        assert engine is not None
        sleep = controller.sleep_if_idle("test: idle")
        assert sleep is not None
        await sleep
        assert controller.state is ModelState.SLEEPING
        stats = await engine_get(engine.root_url, "/stats")
        assert stats["weights_valid"] is False  # level 2 discarded them: resumed as they are, it answers garbage

        assert await ask(gw.v1, model_name) == REAL  # woken: weights reloaded, checked with a generation
        assert controller.handle is engine  # the same engine, woken, not a cold start
        assert not [e for e in gw.waker.events.recent(model_name) if e.kind == "wake_failed"]
        assert await engine_get(engine.root_url, "/sleep_log") == SLEEP_LOG[flavor]

        sleep = controller.sleep_if_idle("test: idle before the restart")
        assert sleep is not None
        await sleep
    [container] = docker_client.containers.list(filters={"label": f"sparkgate.model={model_name}"})
    started_at = container.attrs["State"]["StartedAt"]

    async with run_gateway(models) as gw:  # the engine sleeps on: adopted as it is
        controller = gw.waker.controller(model_name)
        assert controller.state is ModelState.SLEEPING
        assert any("adopting sleeping engine" in e.reason for e in gw.waker.events.recent(model_name))
        assert gw.waker.admissions["local"].held_gb() == 1  # its sleeping footprint, not its 10 GB
        assert await ask(gw.v1, model_name) == REAL
        assert controller.state is ModelState.READY
        assert not [e for e in gw.waker.events.recent(model_name) if e.kind == "wake_failed"]
    [after] = docker_client.containers.list(filters={"label": f"sparkgate.model={model_name}"})
    assert after.id == container.id and after.attrs["State"]["StartedAt"] == started_at  # never restarted


async def test_an_sglang_engine_found_awake_is_adopted_ready_not_asleep(
        tmp_path: Path, docker_client: docker.DockerClient, model_name: str) -> None:
    # Its note says it woke: the next gateway must not "wake" it (resuming tags that were not released kills SGLang).
    models = write_models(tmp_path, sleeping_spec(model_name, "sglang"))
    async with run_gateway(models) as gw:
        controller = gw.waker.controller(model_name)
        assert await ask(gw.v1, model_name) == REAL
        sleep = controller.sleep_if_idle("test: idle")
        assert sleep is not None
        await sleep
        assert await ask(gw.v1, model_name) == REAL  # woken: its note now says awake
    async with run_gateway(models) as gw:
        controller = gw.waker.controller(model_name)
        await controller.settled()
        assert controller.state is ModelState.READY
        assert await ask(gw.v1, model_name) == REAL
        log = await engine_get(controller.handle.root_url, "/sleep_log")  # type: ignore[union-attr]
        assert len(log) == 4  # the one sleep and wake of the first gateway; nothing since
