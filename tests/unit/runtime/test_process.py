"""Engines as local processes: stopping them, also when whoever stops them gives up waiting."""

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime.base import ProcessGroupEngine
from waker.runtime.process import ProcessHandle, ProcessRuntime

# An engine that ignores SIGTERM (it says so each time, so a test knows the stop is in its grace period).
IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('TERM ignored', flush=True))\n"
    "print('up', flush=True)\n"
    "while True:\n"
    "    time.sleep(60)\n"
)


async def until_printed(handle: ProcessHandle, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in await handle.log_tail(50):
        assert time.monotonic() < deadline, f"the engine never printed {line!r}"
        await asyncio.sleep(0.01)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def stubborn() -> AsyncIterator[ProcessHandle]:
    """A started engine that ignores SIGTERM; killed afterwards whatever the test did."""
    spec = ModelSpec(name="stubborn", command=[sys.executable, "-c", IGNORES_SIGTERM])
    handle = await ProcessRuntime().start(spec, engine_for("generic"))
    try:
        await until_printed(handle, "up")
        yield handle
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.process_group, signal.SIGKILL)
        await handle.stop(0)


async def test_an_engine_is_its_own_process_group(stubborn: ProcessHandle) -> None:
    assert isinstance(stubborn, ProcessGroupEngine)
    assert stubborn.process_group == os.getpgid(stubborn.pid) == stubborn.pid


async def test_an_engine_that_ignores_sigterm_is_killed_after_its_grace(stubborn: ProcessHandle) -> None:
    code = await stubborn.stop(grace=0.2)
    assert code == -signal.SIGKILL
    assert not group_alive(stubborn.process_group)


async def test_a_stop_cancelled_during_its_grace_still_ends_the_engine(stubborn: ProcessHandle) -> None:
    """A second cancel during a start's clean-up (two stops; a stop, then shutdown) must not leave the engine
    alive: the cancelled stop kills the whole group and reaps it before the cancellation propagates."""
    stopping = asyncio.ensure_future(stubborn.stop(grace=60))
    await until_printed(stubborn, "TERM ignored")  # SIGTERM sent and ignored: the stop waits out its grace
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert not group_alive(stubborn.process_group)
    assert stubborn.exit_code == -signal.SIGKILL
