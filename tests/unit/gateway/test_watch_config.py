"""The models.d file watch, stepped poll by poll (no sleeps): a change applies once two polls agree (a file caught
mid-write is not read), a models.d that can't load is logged once and the watch goes on to apply the next edit, a
link to nothing does not blind it, and nothing a poll raises ends it. Each test here failed before its fix."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from gateway import app as gateway_app
from gateway.app import reload_logged, watch_config
from gateway.settings import GatewaySettings
from tests.fakes import FakeEngineApi, FakeRuntime
from waker.clock import FakeClock
from waker.config.nodes import NodeConfig
from waker.config.registry import load_dir
from waker.config.spec import RuntimeKind
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.waker import Waker


def entry(name: str, **fields: Any) -> str:
    return yaml.safe_dump({"name": name, "runtime": "docker", "image": "img", "engine": "generic", "memory_gb": 10,
                           **fields})


class Steps:
    """The watch's waits between polls, released by the test: `poll()` lets one poll run and returns once the watch
    waits again, or raises what ended it."""

    def __init__(self) -> None:
        self._go: asyncio.Queue[None] = asyncio.Queue()
        self._waiting = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        self._waiting.set()
        await self._go.get()

    async def waiting(self) -> None:
        assert self.task is not None
        waiting = asyncio.ensure_future(self._waiting.wait())
        await asyncio.wait({waiting, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            self.task.result()  # what ended the watch
            raise AssertionError("the watch ended")

    async def poll(self, times: int = 1) -> None:
        for _ in range(times):
            self._waiting.clear()
            self._go.put_nowait(None)
            await self.waiting()


@asynccontextmanager
async def watching(tmp_path: Path) -> AsyncIterator[tuple[Steps, Waker, Path]]:
    """A waker over tmp_path/models.d (one model, `a`) and its file watch, with the app state the watch reads."""
    models = tmp_path / "models.d"
    models.mkdir()
    (models / "a.yaml").write_text(entry("a"))
    settings = GatewaySettings(config_dir=models, stats_db=tmp_path / "stats.sqlite3",
                               nodes={"local": NodeConfig(total_gb=100, reserve_gb=0, unified_memory=False)})
    runtime = FakeRuntime()
    waker = Waker(load_dir(models), runtimes={RuntimeKind.DOCKER: runtime}, budgets={"local": Budget(100, 0)},
                  probes={"local": FixedProbe(None)}, clock=FakeClock(), engine_api=FakeEngineApi(runtime))
    app = SimpleNamespace(state=SimpleNamespace(settings=settings, waker=waker))
    steps = Steps()
    async with waker:
        steps.task = asyncio.create_task(watch_config(app, tick=steps.tick))  # type: ignore[arg-type]
        try:
            await steps.waiting()  # its first fingerprint is taken
            yield steps, waker, models
        finally:
            steps.task.cancel()


def reloads(waker: Waker) -> list[dict[str, Any]]:
    return [e.data for e in waker.events.recent() if e.kind == "reload"]


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "NOT reloaded" in r.getMessage()]


async def test_a_change_is_applied_only_once_two_polls_agree(tmp_path: Path) -> None:
    # A file caught mid-write that was still valid YAML was applied: here `b` without its memory_gb (0).
    async with watching(tmp_path) as (steps, waker, models):
        whole = entry("b", memory_gb=50)
        half = whole[:whole.index("memory_gb")] + whole[whole.index("name"):]  # valid, without memory_gb
        (models / "b.yaml").write_text(half)
        await steps.poll()
        assert reloads(waker) == []  # seen once
        (models / "b.yaml").write_text(whole)
        await steps.poll()
        assert reloads(waker) == []  # changed since the last poll: still being written
        await steps.poll()
        assert reloads(waker) == [{"added": ["b"]}]
        assert waker.registry["b"].memory_gb == 50
        await steps.poll(3)
        assert len(reloads(waker)) == 1  # each change once


async def test_a_file_that_fails_to_load_is_logged_once_and_the_next_edit_applies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A file that is not UTF-8 raised UnicodeDecodeError out of the watch: it ended for good, and no later edit
    # was applied.
    caplog.set_level(logging.INFO, "sparkgate")
    async with watching(tmp_path) as (steps, waker, models):
        (models / "b.yaml").write_bytes(entry("b").encode() + "# caf\xe9\n".encode("latin-1"))
        await steps.poll(5)
        [refused] = refusals(caplog)
        assert "b.yaml: not UTF-8 text" in refused
        assert list(waker.registry) == ["a"]
        (models / "b.yaml").write_text(entry("b"))
        await steps.poll(2)
        assert reloads(waker) == [{"added": ["b"]}]
        assert len(refusals(caplog)) == 1


@pytest.mark.parametrize("bad", [
    pytest.param("args: " + "[" * 2000 + "]" * 2000 + "\n", id="nested-too-deep"),
    pytest.param("name: c\n", id="key-given-twice"),
])
async def test_other_bad_files_do_not_end_the_watch(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     bad: str) -> None:
    async with watching(tmp_path) as (steps, waker, models):
        (models / "b.yaml").write_text(entry("b") + bad)
        await steps.poll(2)
        [refused] = refusals(caplog)
        assert "b.yaml: line " in refused
        (models / "b.yaml").write_text(entry("b"))
        await steps.poll(2)
        assert "b" in waker.registry


async def test_a_link_to_nothing_does_not_blind_the_watch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Its stat failed, which made the whole fingerprint empty: no change was seen while the link was there.
    async with watching(tmp_path) as (steps, waker, models):
        (models / "b.yaml").symlink_to(tmp_path / "b-entry.yaml")
        await steps.poll(2)
        [refused] = refusals(caplog)
        assert "b.yaml: a symbolic link to" in refused and "which leads to no file" in refused
        (tmp_path / "b-entry.yaml").write_text(entry("b"))  # the link now leads to a model
        await steps.poll(2)
        assert reloads(waker) == [{"added": ["b"]}]


async def test_nothing_a_poll_raises_ends_the_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with watching(tmp_path) as (steps, waker, models):
        real_fingerprint = gateway_app.fingerprint

        def broken_fingerprint(directory: Path) -> object:
            monkeypatch.setattr(gateway_app, "fingerprint", real_fingerprint)  # once
            raise RuntimeError("stat exploded")

        monkeypatch.setattr(gateway_app, "fingerprint", broken_fingerprint)
        await steps.poll()
        assert any("a poll failed" in r.getMessage() and r.exc_info for r in caplog.records)

        real_reload = waker.reload_from

        async def broken_reload(load: Any) -> dict[str, list[str]]:
            monkeypatch.setattr(waker, "reload_from", real_reload)  # once
            raise RuntimeError("reload exploded")

        monkeypatch.setattr(waker, "reload_from", broken_reload)
        (models / "b.yaml").write_text(entry("b"))
        await steps.poll(2)
        assert any("the reload failed" in r.getMessage() and r.exc_info for r in caplog.records)
        assert list(waker.registry) == ["a"]
        (models / "c.yaml").write_text(entry("c"))
        await steps.poll(2)
        assert reloads(waker) == [{"added": ["b", "c"]}]


async def test_a_sighup_reload_that_raises_is_logged_not_left_in_its_task(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def broken_reload(load: Any) -> dict[str, list[str]]:
        raise RuntimeError("reload exploded")

    app = SimpleNamespace(state=SimpleNamespace(settings=GatewaySettings(config_dir=tmp_path),
                                                waker=SimpleNamespace(reload_from=broken_reload)))
    await reload_logged(app)  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if "NOT reloaded" in r.getMessage()]
    assert record.exc_info is not None and "reload exploded" in str(record.exc_info[1])
