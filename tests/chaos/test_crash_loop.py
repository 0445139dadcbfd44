"""Engines that never come up: each failed start is a 503 with the reason; a crash loop backs off
(2 s, 4 s ... visible as `failures` and `retry_in` in /v1/models/{name}), and a request during the
backoff gets 503 at once with Retry-After instead of another doomed start."""

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.chaos.util import assert_openai_error
from tests.harness import fake_engine_spec, run_gateway, write_models

CASES = {
    "exits-at-start": (("--exit-at-start", "3"), "model_start_failed",
                       ["exited with code 3 during start", "error: out of memory while loading weights"]),
    "never-ready": (("--never-ready",), "model_start_timeout",
                    ["did not become ready within its start_timeout of 1s", "fake engine loop starting"]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_failed_starts_give_503_with_the_reason_and_a_crash_loop_backs_off(tmp_path: Path, case: str) -> None:
    flags, code, reasons = CASES[case]
    models = write_models(tmp_path, fake_engine_spec("loop", *flags, start_timeout="1s", stop_timeout="2s"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        loop = asyncio.get_running_loop()
        body = {"model": "loop", "messages": []}

        async def attempt() -> tuple[httpx.Response, float]:
            began = loop.time()
            resp = await client.post(gw.v1 + "/chat/completions", json=body)
            return resp, loop.time() - began

        async def status() -> dict:
            return (await client.get(gw.v1 + "/models/loop")).json()

        # 1st failure: the reason, and no backoff yet (one crash must not cost the user a wait).
        resp, _ = await attempt()
        assert resp.status_code == 503
        error = assert_openai_error(resp.json())
        assert error["code"] == code
        for reason in reasons:
            assert reason in error["message"]
        assert "Retry-After" in resp.headers
        first = await status()
        assert first["state"] == "failed" and first["failures"] == 1 and first["retry_in"] == 0

        # 2nd failure (started again at once): now it backs off.
        resp, _ = await attempt()
        assert resp.status_code == 503 and assert_openai_error(resp.json())["code"] == code
        assert gw.starts("loop") == 2
        second = await status()
        assert second["failures"] == 2 and 0 < second["retry_in"] <= 2
        assert reasons[0] in second["error"]

        # During the backoff: 503 at once, with Retry-After, and no third start.
        resp, waited = await attempt()
        assert waited < 0.5
        assert resp.status_code == 503
        error = assert_openai_error(resp.json())
        assert "failed 2 times in a row; next start attempt in" in error["message"]
        assert reasons[0] in error["message"]
        assert 1 <= int(resp.headers["Retry-After"]) <= 2
        assert gw.starts("loop") == 2

        # After the backoff the next request tries again; the delay doubles.
        await asyncio.sleep(second["retry_in"])  # the backoff itself is what is being tested
        resp, _ = await attempt()
        assert resp.status_code == 503
        assert gw.starts("loop") == 3
        third = await status()
        assert third["failures"] == 3 and 2 < third["retry_in"] <= 4

        failed = [e for e in gw.waker.events.recent("loop") if e.target == "failed"]
        assert [e.data["failures"] for e in failed] == [1, 2, 3]
        assert [e.data["retry_in"] for e in failed] == [0, 2, 4]
        listing = {m["id"]: m for m in (await client.get(gw.v1 + "/models")).json()["data"]}
        assert listing["loop"]["failures"] == 3 and listing["loop"]["retry_in"] > 2
