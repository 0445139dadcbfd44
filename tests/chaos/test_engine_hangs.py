"""Engines that go silent: a request to a wedged engine gets 504 at upstream_read_timeout, and an
engine whose health route never answers fails its start with 503 at start_timeout, each readiness
probe bounded by its own probe_timeout (the probe loop never hangs on one probe)."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.chaos.util import alive, assert_openai_error, until
from tests.harness import fake_engine_spec, run_gateway, write_models


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_engine_that_never_answers_a_request_gives_504_at_upstream_read_timeout(
        tmp_path: Path, stream: bool) -> None:
    models = write_models(tmp_path, fake_engine_spec("wedged", "--hang-requests", stop_timeout="1s"))
    async with run_gateway(models, upstream_read_timeout=1) as gw, httpx.AsyncClient(timeout=30) as client:
        body = {"model": "wedged", "messages": [], "max_tokens": 2, "stream": stream}
        # The first request cold-starts the engine (health is fine), then hangs in the engine.
        loop = asyncio.get_running_loop()
        for attempt in range(2):  # cold, then warm: both bounded the same way
            began = loop.time()
            resp = await client.post(gw.v1 + "/chat/completions", json=body)
            waited = loop.time() - began
            if stream and attempt == 0:  # a cold stream has its 200 at once (issue 18): the 504 comes in-band
                assert resp.status_code == 200
                error = assert_openai_error(json.loads(resp.text.rstrip().rsplit("data: ", 1)[1]))
            else:
                assert resp.status_code == 504
                error = assert_openai_error(resp.json())
            assert error["code"] == "gateway_timeout"
            assert "The engine for 'wedged' sent nothing for 1s" in error["message"]
            assert 0.9 <= waited < 10
        controller = gw.waker.controller("wedged")
        assert controller.state == "ready"  # a slow answer is not a crash: the engine stays up
        assert controller.in_flight == 0
        assert gw.starts("wedged") == 1
        async with httpx.AsyncClient(timeout=5) as engine:
            stats = (await engine.get(controller.handle.root_url + "/stats")).json()
        assert stats["hung"] == 2  # the engine did get both requests


async def test_engine_whose_health_never_answers_fails_its_start_at_start_timeout(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("mute", "--hang-health", start_timeout="2s", stop_timeout="1s"))
    async with run_gateway(models, probe_timeout=0.3, probe_interval=0.05) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()
        request = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json={"model": "mute", "messages": []}))
        await gw.waker.events.wait_for(lambda e: e.target == "starting", timeout=10)
        controller = gw.waker.controller("mute")
        await until(lambda: controller.handle is not None, timeout=10, what="engine launched")
        pid = controller.handle.pid
        resp = await request
        waited = loop.time() - began
        assert resp.status_code == 503
        error = assert_openai_error(resp.json())
        assert error["code"] == "model_start_timeout"
        assert "did not become ready within its start_timeout of 2s" in error["message"]
        # At start_timeout, plus the engine's stop (it ignores SIGTERM: SIGKILL after stop_timeout): the
        # model leaves the budget only once its engine is gone, and the error is sent then.
        print(f"start_timeout 2s, stop_timeout 1s: 503 after {waited:.2f}s")
        assert 2 <= waited < 2 + 1 + 3
        assert "Retry-After" in resp.headers
        # Each probe gave up after probe_timeout and the next one was sent: the engine logged many
        # unanswered readiness requests, not one that hung the probe loop for the whole start_timeout.
        probes = error["message"].count("hanging GET /v1/models")
        assert probes >= 3, error["message"]
        failed = await gw.waker.events.wait_for(lambda e: e.target == "failed", timeout=5)
        assert failed.data["exit_code"] is not None
        assert not alive(pid)  # the half-started engine was stopped
        state = (await client.get(gw.v1 + "/models/mute")).json()
        assert state["state"] == "failed" and state["failures"] == 1
