"""The memory budget through the gateway, with real engine processes (tests/fake_engine.py)."""

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import FAKE_ENGINE, fake_engine_spec, run_gateway, write_models
from waker.config.registry import ConfigError
from waker.scheduling.plan import held_gb
from waker.state import ModelState

NODE_100 = {"local": {"total_gb": 100, "reserve_gb": 0, "memory_probe": "none"}}


def ledger_high_water(gw, budgeted: dict[str, float]) -> float:
    """Replay every transition in the event log and return the most memory ever held."""
    state = dict.fromkeys(budgeted, ModelState.STOPPED)
    high = 0.0
    for event in gw.waker.events.recent():
        if event.kind == "transition" and event.model in state:
            state[event.model] = ModelState(event.target)
            high = max(high, sum(held_gb(state[m], gb, 0) for m, gb in budgeted.items()))
    return high


async def test_three_models_in_a_budget_for_two_swap_and_all_answer(tmp_path: Path) -> None:
    models = write_models(tmp_path, *(fake_engine_spec(n, memory_gb=40, idle_timeout=0) for n in "abc"))
    async with run_gateway(models, nodes=NODE_100) as gw, httpx.AsyncClient(timeout=60) as client:
        answers = []
        for name in "abcabcab":
            resp = await client.post(gw.v1 + "/chat/completions", json={"model": name, "messages": []})
            answers.append(resp.status_code)
        # and a concurrent burst over all three
        burst = await asyncio.gather(*(client.post(gw.v1 + "/chat/completions",
                                                   json={"model": n, "messages": [], "max_tokens": 2})
                                       for n in "abcabc" * 3))
        answers += [r.status_code for r in burst]
        assert answers == [200] * len(answers)

        evictions = [e for e in gw.waker.events.recent() if e.kind == "evict"]
        assert len(evictions) >= 6  # every switch to the third model evicts one
        assert all("making room for" in e.reason for e in evictions)
        assert ledger_high_water(gw, {"a": 40, "b": 40, "c": 40}) <= 100
        assert gw.waker.admissions["local"].high_water_gb <= 100
        running = [n for n in "abc" if gw.waker.controller(n).state == "ready"]
        assert len(running) <= 2


async def test_full_queue_is_429_and_no_room_in_time_is_503_with_the_numbers(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("big", "--token-delay", "0.2", memory_gb=70),
                          fake_engine_spec("other", memory_gb=60))
    async with run_gateway(models, nodes=NODE_100, max_queue=1, max_wait=1.0) as gw, \
            httpx.AsyncClient(timeout=60) as client:
        # "big" busy with a slow stream for a while: "other" can't get room
        body = {"model": "big", "messages": [], "max_tokens": 30, "stream": True}
        async with client.stream("POST", gw.v1 + "/chat/completions", json=body) as stream:
            first = asyncio.create_task(client.post(gw.v1 + "/chat/completions",
                                                    json={"model": "other", "messages": []}))
            await gw.waker.events.wait_for(lambda e: e.kind == "queued" and e.model == "other", 10)
            second = await client.post(gw.v1 + "/chat/completions", json={"model": "other", "messages": []})
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "queue_full"
            late = await first
            assert late.status_code == 503
            error = late.json()["error"]
            assert error["code"] == "no_room"
            assert "other needs 60 GB; 30 GB of the 100 GB budget on node 'local' is free; held by big (70 GB, " \
                "1 in flight)" in error["message"]
            assert int(late.headers["Retry-After"]) > 0
            await stream.aread()


def vllm_like(name: str, **fields: object) -> dict[str, object]:
    """The fake engine driven through the vLLM adapter (`vllm serve` flags, sleep routes)."""
    return {"name": name, "engine": "vllm", "model": "org/fake-weights", "command": [sys.executable, FAKE_ENGINE],
            "start_timeout": "20s", "stop_timeout": "5s", "min_uptime": 0, **fields}


async def sleep_log(gw, name: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        return (await client.get(gw.waker.controller(name).handle.root_url + "/sleep_log")).json()


async def test_idle_model_sleeps_through_vllm_sleep_mode_and_wakes_on_the_next_request(tmp_path: Path) -> None:
    models = write_models(tmp_path, vllm_like("napper", idle_action="sleep", idle_timeout="1s", memory_gb=40,
                                              sleep_memory_gb=4))
    async with run_gateway(models, nodes=NODE_100, reap_interval=0.1) as gw, \
            httpx.AsyncClient(timeout=60) as client:
        body = {"model": "napper", "messages": [], "max_tokens": 2}
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        pid = gw.waker.controller("napper").handle.pid

        await gw.waker.events.wait_for(lambda e: e.target == "sleeping", 10)
        for _ in range(100):  # the sleep call completes just after the transition
            if await sleep_log(gw, "napper") and gw.waker.admissions["local"].held_gb() == 4:
                break
            # Until the engine has answered its sleep call it still holds its memory, and the ledger says so.
            assert gw.waker.admissions["local"].held_gb() == 40
            await asyncio.sleep(0.02)
        assert await sleep_log(gw, "napper") == ["sleep level=2"]
        assert gw.waker.admissions["local"].held_gb() == 4  # counted by its sleeping footprint
        listing = (await client.get(gw.v1 + "/models/napper")).json()
        assert listing["state"] == "sleeping"

        reply = await client.post(gw.v1 + "/chat/completions", json=body)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == " t0 t1"
        assert gw.waker.controller("napper").handle.pid == pid  # woken, not restarted
        assert await sleep_log(gw, "napper") == [
            "sleep level=2", "wake_up tags=weights", "collective_rpc reload_weights", "wake_up tags=kv_cache"]
        woke = [e for e in gw.waker.events.recent() if e.kind == "transition" and e.source == "waking"]
        assert woke[-1].target == "ready"
        assert gw.starts("napper") == 1


async def test_level_one_sleep_wakes_with_a_single_call(tmp_path: Path) -> None:
    models = write_models(tmp_path, vllm_like("light", idle_action="sleep", sleep_level=1, idle_timeout="1s",
                                              memory_gb=10))
    async with run_gateway(models, nodes=NODE_100, reap_interval=0.1) as gw, \
            httpx.AsyncClient(timeout=60) as client:
        body = {"model": "light", "messages": [], "max_tokens": 1}
        await client.post(gw.v1 + "/chat/completions", json=body)
        await gw.waker.events.wait_for(lambda e: e.target == "sleeping", 10)
        assert (await client.post(gw.v1 + "/chat/completions", json=body)).status_code == 200
        assert await sleep_log(gw, "light") == ["sleep level=1", "wake_up"]


async def test_sleeping_model_is_evicted_before_a_ready_one(tmp_path: Path) -> None:
    models = write_models(
        tmp_path,
        vllm_like("sleepy", idle_action="sleep", idle_timeout="1s", memory_gb=40, sleep_memory_gb=30),
        fake_engine_spec("awake", memory_gb=40, idle_timeout=0),
        fake_engine_spec("newcomer", memory_gb=40, idle_timeout=0),
    )
    async with run_gateway(models, nodes=NODE_100, reap_interval=0.1) as gw, \
            httpx.AsyncClient(timeout=60) as client:
        await client.post(gw.v1 + "/chat/completions", json={"model": "sleepy", "messages": []})
        await gw.waker.events.wait_for(lambda e: e.target == "sleeping", 10)
        await client.post(gw.v1 + "/chat/completions", json={"model": "awake", "messages": []})
        # held: 30 (sleeping) + 40 = 70; "newcomer" needs 40, so one of them must go: the sleeping one.
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "newcomer", "messages": []})
        assert resp.status_code == 200
        [evict] = [e for e in gw.waker.events.recent() if e.kind == "evict"]
        assert evict.model == "sleepy"
        assert gw.waker.controller("awake").state == "ready"


async def test_model_bigger_than_the_budget_is_refused_at_boot(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("huge", memory_gb=500))
    with pytest.raises(ConfigError, match="huge needs 500 GB but node 'local' has a budget of 100 GB"):
        async with run_gateway(models, nodes={"local": {"total_gb": 100, "reserve_gb": 0}}):
            pass
