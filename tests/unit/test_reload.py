"""models.d reloaded while models run, start, wait for room or are being removed: what applies when, and what
never breaks. Fake engines and a fake clock; each test here failed before its fix."""

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import Registry, load_dir
from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import ModelNotFound
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.state import ModelState
from waker.waker import Waker

S = ModelState


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "runtime": "docker", "image": "img", "engine": "generic",
                                     "memory_gb": gb, "min_uptime": 0, **fields})


@asynccontextmanager
async def waker_with(*specs: ModelSpec, nodes: dict[str, float] | None = None) -> AsyncIterator[Waker]:
    runtime = FakeRuntime()
    nodes = nodes or {"local": 100.0}
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.DOCKER: runtime},
                  budgets={n: Budget(gb, 0) for n, gb in nodes.items()}, probes={n: FixedProbe(None) for n in nodes},
                  clock=FakeClock(), queue=QueuePolicy(max_wait=60), engine_api=FakeEngineApi(runtime))
    waker.runtime = runtime  # type: ignore[attr-defined]
    async with waker:
        yield waker


async def queued(waker: Waker, model: str) -> None:
    await waker.events.wait_for(lambda e: e.kind == "queued" and e.model == model, 1)


async def test_removing_a_model_whose_requests_wait_for_room_answers_them_at_once() -> None:
    # The node's admission used to keep a ticket for a model it no longer knew: every cold request on that node
    # got a KeyError 500, and the removed model's waiters leaked until max_wait.
    async with waker_with(spec("busy", 60), spec("gone", 60), spec("cold", 30)) as w:
        async with w.lease("busy"):
            waiting = asyncio.create_task(w.gate("gone").acquire())
            await queued(w, "gone")
            await w.reload(Registry([spec("busy", 60), spec("cold", 30)]))
            with pytest.raises(ModelNotFound, match=r"removed from models\.d"):
                await asyncio.wait_for(waiting, 1)
            assert w.admissions["local"].queued == 0
            async with w.lease("cold"):  # the node's admission still works
                assert w.admissions["local"].held_gb() == 90


async def test_moving_a_model_whose_requests_wait_for_room_serves_them_on_its_new_node() -> None:
    async with waker_with(spec("busy", 60, node="a"), spec("mover", 60, node="a"),
                          nodes={"a": 100.0, "b": 100.0}) as w:
        async with w.lease("busy"):
            waiting = asyncio.create_task(w.gate("mover").acquire())
            await queued(w, "mover")
            await w.reload(Registry([spec("busy", 60, node="a"), spec("mover", 60, node="b")]))
            endpoint = await asyncio.wait_for(waiting, 1)
            w.gate("mover").release()
        assert endpoint.spec.node == "b"
        assert w.describe().model("mover").held_on == {"b": 60}


async def test_a_policy_reload_never_exceeds_max_concurrent() -> None:
    # A policy-only reload replaced the max_concurrent semaphore: the old and the new one let up to 2x through.
    async with waker_with(spec("m", 10, max_concurrent=2)) as w:
        gate = w.gate("m")
        inside = 0
        most = 0
        release = asyncio.Event()

        async def request() -> None:
            nonlocal inside, most
            async with gate.slot(), gate.lease():
                inside += 1
                most = max(most, inside)
                await release.wait()
                inside -= 1

        first = [asyncio.create_task(request()) for _ in range(3)]
        while gate.limiter.waiting < 1:
            await asyncio.sleep(0)
        await w.reload(Registry([spec("m", 10, max_concurrent=2, priority=5)]))  # policy only
        later = [asyncio.create_task(request()) for _ in range(3)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert inside == 2 and gate.limiter.active == 2
        release.set()
        await asyncio.gather(*first, *later)
        assert most == 2


async def test_raising_memory_gb_of_a_running_model_applies_from_its_next_start() -> None:
    # The ledger read 130 of 100 GB right after such a reload: the running engine was counted at the new size.
    async with waker_with(spec("a", 60), spec("b", 40)) as w:
        await _use(w, "a")
        await _use(w, "b")
        await w.reload(Registry([spec("a", 90), spec("b", 40)]))
        assert w.admissions["local"].held_gb() == 100
        status = w.describe().model("a")
        assert (status.spec.memory_gb, status.held_gb) == (90, 60)  # declared now, held by the running engine
        await w.stop("a")
        await _use(w, "a")  # its next start needs 90: b makes room
        assert w.controller("b").state is S.STOPPED
        assert w.admissions["local"].held_gb() == 90


async def test_a_model_added_back_while_it_is_removed_is_recreated_with_its_new_entry() -> None:
    # Re-added while still being removed, it kept its old engine (old args) for good.
    async with waker_with(spec("m", 10, args=["--old"])) as w:
        runtime: FakeRuntime = w.runtime  # type: ignore[attr-defined]
        async with w.lease("m"):
            await w.reload(Registry([spec("other", 10)]))  # m is busy: removed once idle
            assert w.describe().model("m").removed
            await w.reload(Registry([spec("other", 10), spec("m", 10, args=["--new"])]))
        w.settle_reload()  # what the reaper loop does: the old engine goes now that m is idle
        await w.controller("m").settled()
        await _use(w, "m")
        assert runtime.specs[-1].args == ("--new",)
        assert runtime.handles[0].stops == 1


ENTRY = "name: m\nruntime: docker\nimage: img\nengine: generic\nmemory_gb: 10\n"


async def test_concurrent_reloads_apply_the_newest_files_last(tmp_path: Path) -> None:
    # Two reloads at once (file watch, SIGHUP, admin API) could apply the older snapshot last.
    (tmp_path / "m.yaml").write_text(ENTRY + "idle_timeout: 1m\n")
    async with waker_with(spec("m", 10)) as w:
        read, go_on = threading.Event(), threading.Event()

        def slow() -> Registry:  # reads the files, then is slow to hand them over
            registry = load_dir(tmp_path)
            read.set()
            go_on.wait(5)
            return registry

        first = asyncio.create_task(w.reload_from(slow))
        await asyncio.to_thread(read.wait, 5)
        (tmp_path / "m.yaml").write_text(ENTRY + "idle_timeout: 2m\n")
        second = asyncio.create_task(w.reload_from(lambda: load_dir(tmp_path)))
        await asyncio.sleep(0.05)
        go_on.set()
        await asyncio.gather(first, second)
        assert w.registry["m"].idle_timeout == 120
        assert w.controller("m").spec.idle_timeout == 120


async def _use(waker: Waker, name: str) -> None:
    async with waker.lease(name):
        pass
