"""The whole suite's one rule about the machine it runs on: no test writes the user's own stats database.

A gateway started by a test samples memory into `GatewaySettings().stats_db`, by default
`~/.local/state/sparkgate/stats.sqlite3`, the file `sparkgate stats` and `memory_gb: auto` read. Tests that start a
gateway in this process pass their own file (tests/harness.py), but gateways run as subprocesses
(tests/chaos/util.py `GatewayProcess`, `sparkgate serve` in tests/integration) inherit the environment, and the
Docker tests' models (`dk-...`) ended up in the user's statistics. So before anything is collected the environment
points SPARKGATE_STATS_DB and XDG_STATE_HOME into a temporary folder that every gateway of the run, in this process
or a child, inherits; it is removed at the end (tests/stats/test_isolation.py checks the user's file is untouched).
"""

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

_STATE_VARIABLES = ("SPARKGATE_STATS_DB", "XDG_STATE_HOME")
_saved = pytest.StashKey[tuple[dict[str, str | None], str]]()  # the variables as they were, and the folder


def pytest_configure(config: pytest.Config) -> None:
    state = tempfile.mkdtemp(prefix="sparkgate-test-state-")
    config.stash[_saved] = ({name: os.environ.get(name) for name in _STATE_VARIABLES}, state)
    os.environ["XDG_STATE_HOME"] = state
    os.environ["SPARKGATE_STATS_DB"] = os.path.join(state, "sparkgate", "stats.sqlite3")


def pytest_unconfigure(config: pytest.Config) -> None:
    saved, state = config.stash.get(_saved, ({}, None))
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if state is not None:
        shutil.rmtree(state, ignore_errors=True)



@pytest.fixture(autouse=True)
def _earlier_tests_garbage_collected() -> Iterator[None]:
    """Garbage an earlier test left is finalized before this one starts, while no event loop runs.

    An unclosed `openai.AsyncOpenAI` schedules its httpx client's `aclose()` on whatever loop is running when the
    collector reaches it; reached during a later test, that task fails ("Event loop is closed": its connections
    belonged to the earlier test's loop) and lands in the later test's log as "Task exception was never retrieved",
    which the tests that assert nothing is logged saw as a failure. Collected here, outside any loop, the finalizer
    finds no running loop and does nothing."""
    gc.collect()
    yield
