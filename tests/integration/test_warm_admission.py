"""`sparkgate warm` and `POST /admin/models/{m}/start` follow the admission of the start they ask for (issue 17):
a start queued for memory says where it waits and ends ready, not failed with the model's old failure; a start
refused (no room ever, max_wait exceeded) ends at once with the reason. A real gateway with fake engine
processes; the CLI runs in a thread and looks at the state every 20 ms."""

import argparse
import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.client import run, status_table
from tests.harness import Gateway, fake_engine_spec, run_gateway, write_models
from waker.errors import StartFailed
from waker.state import ModelState

# A budget for one 6 GB model at a time; no live memory probe (the test machine's memory is not the point).
NODE_10 = {"local": {"total_gb": 10, "reserve_gb": 0, "memory_probe": "none"}}
BUSY_STREAM = {"model": "busy", "messages": [], "max_tokens": 100000, "stream": True}


def warm_args(gw: Gateway, model: str, timeout: float = 60) -> argparse.Namespace:
    return argparse.Namespace(url=gw.url, model=model, timeout=timeout, interval=0.02)


class Watched(io.StringIO):
    """The CLI's output, written from its thread; `seen` resolves once `text` appears in it."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text
        self._loop = asyncio.get_running_loop()
        self.seen: asyncio.Future[None] = self._loop.create_future()

    def write(self, s: str) -> int:
        n = super().write(s)
        if self._text in self.getvalue():
            self._loop.call_soon_threadsafe(lambda: self.seen.done() or self.seen.set_result(None))
        return n


async def first_of(out: Watched, cli: "asyncio.Future[Any]", timeout: float = 20) -> None:
    """Wait until the CLI has written what `out` watches for; fail with its output if it ended first."""
    await asyncio.wait({out.seen, cli}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if not out.seen.done():
        result = cli.exception() or cli.result() if cli.done() else "still running"
        pytest.fail(f"the CLI never wrote {out._text!r} (it returned {result!r}); it wrote:\n{out.getvalue()}")


async def fail_once_then_fix(gw: Gateway, client: httpx.AsyncClient, models: Path, spec: dict[str, Any]) -> None:
    """An earlier attempt of `spec`'s model failed (its failure stays in the state); models.d is fixed since."""
    with pytest.raises(StartFailed):
        await gw.waker.gate(spec["name"]).warm()
    write_models(models, spec)
    assert (await client.post("/admin/reload")).json()["changed"] == [spec["name"]]
    assert gw.waker.describe().model(spec["name"]).state is ModelState.FAILED


async def test_warm_queued_behind_a_busy_model_says_so_and_ends_ready_not_with_the_old_failure(
        tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("busy", "--token-delay", "0.05", memory_gb=6),
                          fake_engine_spec("cold", "--exit-at-start", "2", memory_gb=6))
    async with run_gateway(models, nodes=NODE_10) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        await fail_once_then_fix(gw, client, models, fake_engine_spec("cold", memory_gb=6))
        async with client.stream("POST", "/v1/chat/completions", json=BUSY_STREAM) as stream:
            lines = stream.aiter_lines()  # kept: a dropped iterator would close the stream
            while not (await anext(lines)).startswith("data: "):  # past the cold start's keep-alive comments
                pass  # "busy" answers: a request in flight, it can't be evicted
            out = Watched("queued for memory")
            cli = asyncio.ensure_future(asyncio.to_thread(run, "warm", warm_args(gw, "cold"), out))
            await first_of(out, cli)
            state = (await client.get("/admin/state")).json()
            cold = next(m for m in state["models"] if m["name"] == "cold")
            assert cold["state"] == "failed" and cold["admission"]["outcome"] == "queued"
            assert "failed, queued (1)" in status_table(state)
            assert not cli.done()
        # The stream is closed: "busy" idles, is evicted, and "cold" starts.
        assert await asyncio.wait_for(cli, 30) == 0, out.getvalue()
    text = out.getvalue()
    assert "cold: queued for memory behind busy (position 1)" in text
    assert "cold: ready after" in text and "failed" not in text


async def test_warm_of_a_model_pinned_models_leave_no_room_for_ends_at_once_with_the_reason(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("pinned", memory_gb=6, pinned=True),
                          fake_engine_spec("big", memory_gb=6))
    async with run_gateway(models, nodes=NODE_10) as gw:
        await gw.waker.gate("pinned").warm()
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            refused = await client.post("/admin/models/big/start")  # the refusal a request would get
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_room"
        out = io.StringIO()
        with pytest.raises(SystemExit) as refused:
            await asyncio.to_thread(run, "warm", warm_args(gw, "big", timeout=5), out)
        assert str(refused.value) == (
            "sparkgate: big needs 6 GB but only 4 GB of the 10 GB budget is not held by pinned models")
        assert gw.waker.describe().model("big").admission.outcome == "refused"


async def test_warm_refused_after_max_wait_ends_with_the_numbers(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("busy", "--token-delay", "0.05", memory_gb=6),
                          fake_engine_spec("cold", memory_gb=6))
    async with run_gateway(models, nodes=NODE_10, max_wait=0.5) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=BUSY_STREAM) as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: "):  # past the cold start's keep-alive comments
                pass
            out = io.StringIO()
            assert await asyncio.to_thread(run, "warm", warm_args(gw, "cold", timeout=10), out) == 1, out.getvalue()
    text = out.getvalue()
    assert "cold: queued for memory behind busy (position 1)" in text
    assert ("cold: refused: cold needs 6 GB; 4 GB of the 10 GB budget on node 'local' is free; held by busy "
            "(6 GB, 1 in flight). Waited 0.5s (waiting for busy models to finish their requests).") in text
    assert "still not ready" not in text


async def test_admin_start_of_a_model_that_must_wait_answers_202_queued_with_its_place(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("busy", "--token-delay", "0.05", memory_gb=6),
                          fake_engine_spec("cold", memory_gb=6))
    async with run_gateway(models, nodes=NODE_10) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=BUSY_STREAM) as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: "):  # past the cold start's keep-alive comments
                pass
            queued = await client.post("/admin/models/cold/start")
            assert queued.status_code == 202
            body = queued.json()
            assert body["state"] == "stopped" and body["attempt"] == {"admission": 1, "start": 1}
            assert {k: body["admission"][k] for k in ("outcome", "attempt", "node", "position", "waiting_for")} == {
                "outcome": "queued", "attempt": 1, "node": "local", "position": 1, "waiting_for": ["busy"]}
            assert body["admission"]["reason"] == "waiting for busy models to finish their requests"
            again = (await client.post("/admin/models/cold/start")).json()
            assert again["attempt"] == {"admission": 1, "start": 1}  # it joins the ask that waits
            await gw.waker.stop("busy")
        await gw.waker.gate("cold").warm()
        started = (await client.get("/admin/state")).json()
        cold = next(m for m in started["models"] if m["name"] == "cold")
        assert cold["starts"] == 1 and cold["admission"]["outcome"] == "admitted"
