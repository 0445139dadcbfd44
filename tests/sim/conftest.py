import gc
from collections.abc import Iterator

import pytest

from tests.sim.vtime import VirtualTime


@pytest.fixture
def vt() -> Iterator[VirtualTime]:
    """A fresh virtual-time loop; the test drives it with `vt.run(...)` (sync tests: no pytest-asyncio loop)."""
    with VirtualTime() as loop:
        yield loop


@pytest.fixture(autouse=True, scope="module")
def _earlier_tests_garbage_collected() -> None:
    """Garbage that earlier tests left is finalized now, before a simulated loop runs: an unclosed `openai.AsyncOpenAI`
    schedules its httpx client's `aclose()` on whatever loop is running when the collector reaches it, and on a
    simulation's loop that task fails ("Event loop is closed": its connections belonged to the earlier test's loop)
    and lands in the loop's unhandled exceptions, which every simulation asserts stay empty."""
    gc.collect()
