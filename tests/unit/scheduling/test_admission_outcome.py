"""The admission outcome in the read model (`Waker.describe()`: `ModelStatus.admission`), as the cluster admission
writes it on each model's seat: queued (with the place in the node's queue and what it waits behind), admitted,
refused (in the words of the error its requests got) and withdrawn; and `starts`, the attempt a failure belongs to.
Fake engines and a fake clock; nothing waits on real time except max_wait's timer."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import NoRoom, QueueFull, StartFailed
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.state import ModelState
from waker.status import Admission
from waker.waker import Waker

S = ModelState


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "command": ["x"], "memory_gb": gb, "min_uptime": 0, **fields})


@asynccontextmanager
async def waker_with(*specs: ModelSpec, capacity: float = 100,
                     policy: QueuePolicy | None = None) -> AsyncIterator[Waker]:
    runtime = FakeRuntime()
    waker = Waker(Registry(list(specs)), runtimes={RuntimeKind.PROCESS: runtime},
                  budgets={"local": Budget(capacity, 0)}, probes={"local": FixedProbe(None)}, clock=FakeClock(),
                  queue=policy or QueuePolicy(), engine_api=FakeEngineApi(runtime))
    waker.runtime = runtime  # type: ignore[attr-defined]
    async with waker:
        yield waker


def admission(waker: Waker, model: str) -> Admission:
    return waker.describe().model(model).admission


async def use(waker: Waker, name: str) -> None:
    async with waker.lease(name):
        pass


async def queued(waker: Waker, model: str) -> None:
    await waker.events.wait_for(lambda e: e.kind == "queued" and e.model == model, 1)


async def test_a_model_never_asked_for_has_no_admission_and_one_that_fits_is_admitted_at_once() -> None:
    async with waker_with(spec("a", 40)) as w:
        assert admission(w, "a") == Admission()
        w.clock.advance(5)
        await use(w, "a")
        assert admission(w, "a") == Admission(outcome="admitted", reason="started on local", since=w.clock.now(),
                                              attempt=1, node="local")
        assert w.describe().model("a").starts == 1


async def test_a_queued_model_shows_its_place_and_what_it_waits_behind_until_it_is_admitted() -> None:
    async with waker_with(spec("busy", 60), spec("cold", 60), spec("later", 30), capacity=100) as w:
        lease = w.lease("busy")
        await lease.__aenter__()  # a request in flight on "busy": it can't be evicted
        cold = asyncio.create_task(w.gate("cold").warm())
        await queued(w, "cold")
        w.clock.advance(3)
        later = asyncio.create_task(use(w, "later"))
        await queued(w, "later")
        w.clock.advance(2)

        first, second = admission(w, "cold"), admission(w, "later")
        assert first == Admission(outcome="queued", reason="waiting for busy models to finish their requests",
                                  since=w.clock.now() - 5, attempt=1, node="local", position=1,
                                  waiting_for=("busy",))
        # FIFO: the later ticket waits behind the earlier one, then behind what holds the memory.
        assert (second.outcome, second.position, second.waiting_for) == ("queued", 2, ("cold", "busy"))
        assert w.describe().model("cold").state is S.STOPPED  # queued is the admission's, not a lifecycle state

        await lease.__aexit__(None, None, None)  # "busy" idles: it is evicted and "cold" starts
        await asyncio.wait_for(cold, 1)
        assert admission(w, "cold").outcome == "admitted"
        assert admission(w, "cold").position is None and admission(w, "cold").waiting_for == ()
        later.cancel()


async def test_requests_joining_a_queued_ask_share_its_attempt() -> None:
    async with waker_with(spec("busy", 60), spec("cold", 60), capacity=100) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        waiting = [asyncio.create_task(use(w, "cold")) for _ in range(3)]
        await queued(w, "cold")
        await asyncio.sleep(0)  # the other two join the ticket
        assert admission(w, "cold").attempt == 1 and w.describe().model("cold").queued == 3
        await lease.__aexit__(None, None, None)
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert admission(w, "cold").attempt == 1 and admission(w, "cold").outcome == "admitted"
        await w.stop("cold")
        await use(w, "cold")  # a new ask
        assert admission(w, "cold").attempt == 2


async def test_a_model_pinned_models_leave_no_room_for_is_refused_with_the_words_of_its_503() -> None:
    async with waker_with(spec("pinned", 60, pinned=True), spec("big", 60), capacity=100) as w:
        await use(w, "pinned")
        with pytest.raises(NoRoom) as refused:
            await w.gate("big").warm()
        got = admission(w, "big")
        assert got.outcome == "refused" and got.reason == refused.value.message
        assert got.reason == "big needs 60 GB but only 40 GB of the 100 GB budget is not held by pinned models"
        assert (got.attempt, got.node, got.position) == (1, "local", None)


async def test_max_wait_exceeded_is_refused_with_the_numbers_its_request_got() -> None:
    async with waker_with(spec("busy", 60), spec("cold", 60), capacity=100,
                          policy=QueuePolicy(max_wait=0.05)) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        with pytest.raises(NoRoom) as refused:
            await w.gate("cold").warm()
        got = admission(w, "cold")
        assert got.outcome == "refused" and got.reason == refused.value.message
        assert "cold needs 60 GB; 40 GB of the 100 GB budget on node 'local' is free; held by busy" in got.reason
        await lease.__aexit__(None, None, None)


async def test_one_request_timing_out_leaves_the_ask_queued_for_the_others() -> None:
    async with waker_with(spec("busy", 60), spec("cold", 60), capacity=100,
                          policy=QueuePolicy(max_wait=0.05)) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        first = asyncio.create_task(use(w, "cold"))
        await queued(w, "cold")
        # A second waiter on the same ask, with no max_wait of its own: the ticket outlives the first one.
        w.scheduler.enqueue("cold", keeper := _Keeper())
        with pytest.raises(NoRoom):
            await first
        assert admission(w, "cold").outcome == "queued"
        w.scheduler.withdraw("cold", keeper)
        assert admission(w, "cold").outcome == "withdrawn"
        assert admission(w, "cold").reason == "nobody waits for it any more"
        await lease.__aexit__(None, None, None)


class _Keeper:
    def admitted(self) -> None:
        pass

    def refused(self, error: Exception) -> None:
        pass


async def test_a_request_that_leaves_withdraws_the_ask() -> None:
    async with waker_with(spec("busy", 60), spec("cold", 60), capacity=100) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        waiting = asyncio.create_task(use(w, "cold"))
        await queued(w, "cold")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert admission(w, "cold").outcome == "withdrawn"
        await lease.__aexit__(None, None, None)


async def test_a_full_queue_refuses_a_new_ask_but_not_the_one_already_queued() -> None:
    async with waker_with(spec("busy", 60), spec("cold", 60), spec("other", 60), capacity=100,
                          policy=QueuePolicy(max_queue=1)) as w:
        lease = w.lease("busy")
        await lease.__aenter__()
        waiting = asyncio.create_task(use(w, "cold"))
        await queued(w, "cold")
        with pytest.raises(QueueFull) as full:
            await use(w, "cold")  # joins cold's ask, but the queue is full: cold's ask goes on
        assert admission(w, "cold").outcome == "queued"
        with pytest.raises(QueueFull) as full:
            await use(w, "other")
        assert admission(w, "other").outcome == "refused" and admission(w, "other").reason == full.value.message
        waiting.cancel()
        await lease.__aexit__(None, None, None)


async def test_starts_counts_the_attempts_a_failure_belongs_to() -> None:
    async with waker_with(spec("m", 10)) as w:
        w.runtime.fail_launch = RuntimeError("no such image")  # type: ignore[attr-defined]
        with pytest.raises(StartFailed):
            await w.gate("m").warm()
        failed = w.describe().model("m")
        assert (failed.state, failed.starts, failed.admission.attempt) == (S.FAILED, 1, 1)
        w.runtime.fail_launch = None  # type: ignore[attr-defined]
        await w.gate("m").warm()
        assert (w.describe().model("m").state, w.describe().model("m").starts) == (S.READY, 2)


async def test_a_model_moved_to_other_nodes_keeps_its_latest_admission() -> None:
    runtime = FakeRuntime()
    waker = Waker(Registry([spec("m", 10, node="a")]), runtimes={RuntimeKind.PROCESS: runtime},
                  budgets={"a": Budget(100, 0), "b": Budget(100, 0)},
                  probes={"a": FixedProbe(None), "b": FixedProbe(None)}, clock=FakeClock(),
                  engine_api=FakeEngineApi(runtime))
    async with waker as w:
        await use(w, "m")
        await w.stop("m")
        before = admission(w, "m")
        assert before.outcome == "admitted" and before.node == "a"
        await w.reload(Registry([spec("m", 10, node="b")]))
        assert w.describe().model("m").nodes == ("b",)
        assert admission(w, "m") == before
