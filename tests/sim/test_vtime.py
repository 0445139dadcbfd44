"""Virtual time: waiting costs no real time, timers fire in order, and a run is a pure function of its program."""

import asyncio
import random
import time

import pytest

from tests.sim.vtime import EPOCH, START, Deadlock, Stuck, VirtualTime, advance, settle


def test_an_hour_of_sleep_passes_at_once(vt: VirtualTime) -> None:
    began = time.perf_counter()
    vt.run(asyncio.sleep(3600))
    assert vt.now() == START + 3600
    assert time.perf_counter() - began < 0.5


def test_timeouts_fire_at_their_virtual_deadline(vt: VirtualTime) -> None:
    async def program() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.sleep(60)
        seen.append(("timeout", loop.time()))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 7.5)
        seen.append(("wait_for", loop.time()))
        assert await asyncio.wait_for(asyncio.sleep(2, "in time"), 3) == "in time"
        seen.append(("in time", loop.time()))
        return seen

    assert vt.run(program()) == [("timeout", START + 5), ("wait_for", START + 12.5), ("in time", START + 14.5)]


def _busy_program(seed: int) -> list[tuple[float, str]]:
    """Tasks that sleep, wake each other through events and cancel each other; returns what happened, when."""

    async def program() -> list[tuple[float, str]]:
        loop = asyncio.get_running_loop()
        rng = random.Random(seed)
        events: list[tuple[float, str]] = []
        bell = asyncio.Event()

        async def worker(name: str) -> None:
            for step in range(5):
                await asyncio.sleep(rng.choice([0, 0.5, 1.0, 1.0, 2.5]))  # ties on purpose
                events.append((loop.time(), f"{name} step {step}"))
                if rng.random() < 0.2:
                    bell.set()
            await bell.wait()
            events.append((loop.time(), f"{name} heard the bell"))

        async def sleeper() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                events.append((loop.time(), "sleeper cancelled"))
                raise

        tasks = [asyncio.create_task(worker(f"w{i}")) for i in range(6)]
        lazy = asyncio.create_task(sleeper())
        await asyncio.sleep(4)
        lazy.cancel()
        bell.set()
        await asyncio.gather(*tasks)
        await asyncio.gather(lazy, return_exceptions=True)
        return events

    with VirtualTime() as vt:
        return vt.run(program())


def test_two_runs_of_one_program_happen_alike() -> None:
    first = _busy_program(seed=13)
    assert len(first) == 6 * 6 + 1
    assert _busy_program(seed=13) == first


def test_advance_fires_every_timer_due_meanwhile_and_what_they_wake(vt: VirtualTime) -> None:
    loop = vt.loop
    fired: list[str] = []
    woken = asyncio.Event()

    async def waiter() -> None:
        await woken.wait()
        fired.append(f"waiter woken at {loop.time() - START}")

    async def program() -> None:
        task = asyncio.create_task(waiter())
        loop.call_later(1, fired.append, "1 s")
        loop.call_later(2, lambda: (fired.append("2 s"), woken.set()))
        loop.call_later(2.000001, fired.append, "just after 2 s")
        await advance(2)
        assert task.done()

    vt.run(program(), settle=False)  # advance settles on its own
    assert fired == ["1 s", "2 s", "waiter woken at 2.0"]
    assert vt.now() == START + 2
    vt.run(advance(1))
    assert fired[-1] == "just after 2 s"


def test_settle_runs_every_chain_of_wakeups_without_moving_time(vt: VirtualTime) -> None:
    async def program() -> list[int]:
        order: list[int] = []
        events = [asyncio.Event() for _ in range(50)]

        async def link(i: int) -> None:
            await events[i].wait()
            order.append(i)
            if i + 1 < len(events):
                asyncio.get_running_loop().call_soon(events[i + 1].set)

        links = [asyncio.create_task(link(i)) for i in range(len(events))]
        before = asyncio.get_running_loop().time()
        events[0].set()
        await settle()
        assert asyncio.get_running_loop().time() == before
        assert all(task.done() for task in links)
        return order

    assert vt.run(program(), settle=False) == list(range(50))


def test_settle_sees_the_timers_after_the_loop_purges_cancelled_ones(vt: VirtualTime) -> None:
    """asyncio replaces its timer heap with a new list when over half of more than 100 timers are cancelled; a
    settle that kept the old list saw a timer due for ever and reported a Livelock (found by the simulation)."""

    async def program() -> list[str]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []

        def storm() -> None:  # while settle runs: the loop purges its heap in its next turn
            for timer in [loop.call_later(60, fired.append, "cancelled") for _ in range(150)]:
                timer.cancel()
            loop.call_later(0, fired.append, "due now")

        loop.call_soon(storm)
        await settle()
        return fired

    assert vt.run(program()) == ["due now"]


def test_a_deadlock_is_reported_at_once() -> None:
    """With no limit, looptime sees that nothing can ever happen; with one, the limit comes at once."""
    began = time.perf_counter()
    with VirtualTime() as vt, pytest.raises(Deadlock, match="no timer is set"):
        vt.run(asyncio.Event().wait(), limit=None)
    with VirtualTime() as vt, pytest.raises(Stuck, match="wait"):
        vt.run(asyncio.Event().wait())
    assert time.perf_counter() - began < 0.5


def test_a_run_that_never_ends_while_time_moves_is_stopped_at_its_limit(vt: VirtualTime) -> None:
    async def ticker() -> None:
        while True:
            await asyncio.sleep(1)

    async def program() -> None:
        tick = asyncio.create_task(ticker(), name="ticker")
        await asyncio.Event().wait()
        tick.cancel()

    with pytest.raises(Stuck, match=r"ticker: ticker \(test_vtime.py:\d+\) > sleep"):
        vt.run(program(), limit=600)
    assert vt.now() == START + 600


def test_threads_are_refused(vt: VirtualTime) -> None:
    async def program() -> None:
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.1)

    with pytest.raises(RuntimeError, match="no threads in virtual time"):
        vt.run(program())


def test_the_clock_reads_virtual_time(vt: VirtualTime) -> None:
    assert vt.clock.now() == START
    assert vt.clock.wall() == EPOCH + START
    vt.run(asyncio.sleep(90))
    assert vt.clock.now() == START + 90
    assert vt.clock.wall() == EPOCH + START + 90


def test_close_lets_unfinished_tasks_clean_up_in_virtual_time() -> None:
    cleaned: list[float] = []

    async def holder() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(30)  # e.g. a stop's grace
            cleaned.append(asyncio.get_running_loop().time())

    vt = VirtualTime()

    async def program() -> asyncio.Task[None]:
        return asyncio.create_task(holder())

    task = vt.run(program())
    vt.close()
    assert task.cancelled()
    assert cleaned == [START + 30]
