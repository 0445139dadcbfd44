from collections.abc import Iterator

import pytest

from tests.sim.vtime import VirtualTime


@pytest.fixture
def vt() -> Iterator[VirtualTime]:
    """A fresh virtual-time loop; the test drives it with `vt.run(...)` (sync tests: no pytest-asyncio loop)."""
    with VirtualTime() as loop:
        yield loop
