"""Clients that leave while they wait: their place in the admission queue, or among the waiters of
a cold start, is given up at once; a start that nobody waits for any more still finishes cleanly
(the engine ends up READY and answering, never half started)."""

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest

from tests.chaos.util import alive, until
from tests.harness import fake_engine_spec, run_gateway, write_models

NODE_100 = {"local": {"total_gb": 100, "reserve_gb": 0, "memory_probe": "none"}}


async def client_request(url: str, model: str, stream: bool) -> httpx.Response:
    """One client with its own connection: cancelling it closes the socket, as a leaving client does."""
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"model": model, "messages": [], "max_tokens": 2, "stream": stream}
        return await client.post(url + "/chat/completions", json=body)


async def leave(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_clients_that_leave_the_admission_queue_are_removed_from_it(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("busy", "--token-delay", "0.05", memory_gb=60),
                          fake_engine_spec("queued", memory_gb=60))
    async with run_gateway(models, nodes=NODE_100, keepalive_interval=0.2) as gw, \
            httpx.AsyncClient(timeout=60) as client:
        admission = gw.waker.admissions["local"]
        busy, queued = gw.waker.controller("busy"), gw.waker.controller("queued")
        # "busy" holds 60 of the 100 GB with a long stream: "queued" (60 GB) must wait for it.
        warm = await client.post(gw.v1 + "/chat/completions", json={"model": "busy", "messages": []})
        assert warm.status_code == 200
        body = {"model": "busy", "messages": [], "max_tokens": 400, "stream": True}
        async with client.stream("POST", gw.v1 + "/chat/completions", json=body) as hot:
            chunks = hot.aiter_bytes()  # kept referenced: an abandoned iterator would close the stream
            assert (await anext(chunks)).startswith(b"data: ")  # the stream is under way
            assert busy.in_flight == 1
            waiters = [asyncio.create_task(client_request(gw.v1, "queued", stream=i % 2 == 0)) for i in range(6)]
            await gw.waker.events.wait_for(lambda e: e.kind == "queued" and e.model == "queued", timeout=10)
            await until(lambda: admission.queued == 6, timeout=10, what="all six queued")
            drain = await gw.waker.events.wait_for(lambda e: e.kind == "drain" and e.model == "busy", timeout=10)
            assert drain.data["deadline_in_s"] > 0

            await leave(waiters)
            await until(lambda: admission.queued == 0 and queued.waiting == 0, timeout=10, what="queue emptied")
            assert admission.queue_of("queued") == 0
            # Nobody waits for busy's memory any more: it is no longer drained, and nothing started.
            seat = gw.waker.scheduler.seats["busy"]
            await until(lambda: seat.drain_deadline is None, timeout=10, what="drain lifted")
            assert gw.starts("queued") == 0
            assert busy.state == "ready" and busy.in_flight == 1
            assert admission.held_gb() == 60
        await until(lambda: busy.in_flight == 0, timeout=10, what="hot stream released")
        # The model whose waiters left is served normally later (busy is idle now: evicted for it).
        resp = await client.post(gw.v1 + "/chat/completions", json={"model": "queued", "messages": []})
        assert resp.status_code == 200
        assert gw.starts("queued") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_clients_that_leave_a_cold_start_release_it_and_the_start_still_completes(
        tmp_path: Path, stream: bool) -> None:
    models = write_models(tmp_path, fake_engine_spec("late", "--ready-after", "1.5"))
    async with run_gateway(models, keepalive_interval=0.2) as gw:
        controller = gw.waker.controller("late")
        waiters = [asyncio.create_task(client_request(gw.v1, "late", stream)) for _ in range(10)]
        await gw.waker.events.wait_for(lambda e: e.target == "starting", timeout=10)
        await until(lambda: controller.waiting == 10, timeout=10, what="ten waiting for the start")
        await until(lambda: controller.handle is not None, timeout=10, what="engine launched")
        pid = controller.handle.pid

        await leave(waiters)
        await until(lambda: controller.waiting == 0, timeout=10, what="waiters gone")
        assert controller.state == "starting"  # they left before the engine was ready
        assert gw.waker.admissions["local"].queued == 0

        # Nobody waits any more, yet the start is not abandoned half way: the engine becomes READY.
        ready = await gw.waker.events.wait_for(lambda e: e.target == "ready", timeout=20)
        assert ready.model == "late"
        assert controller.handle.pid == pid and alive(pid)
        assert controller.in_flight == 0 and controller.waiting == 0
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(controller.handle.root_url + "/health")).status_code == 200
            resp = await client.post(gw.v1 + "/chat/completions",
                                     json={"model": "late", "messages": [], "max_tokens": 2})
            assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == " t0 t1"
            stats = (await client.get(controller.handle.root_url + "/stats")).json()
        assert stats["requests"] == 1  # the ten that left never reached the engine
        assert gw.starts("late") == 1
        assert not [e for e in gw.waker.events.recent("late") if e.target == "failed"]
