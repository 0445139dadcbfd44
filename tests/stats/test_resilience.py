"""Statistics are optional: a stats database that can't be opened never keeps the gateway (or `sparkgate check`, or
a reload) from running, and a store that fails to write (a full disk) is said once and retried with a back-off."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import load
from stats.cli import stats_command
from stats.sampler import Sampler
from stats.store import Sample, SampleStore, StoreUnavailable
from tests.harness import fake_engine_spec, run_gateway, write_models
from tests.stats.conftest import Container, FakeWaker, status
from waker.config.machine import MemoryReading, resolve_nodes
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError
from waker.runtime.base import ContainerMemory
from waker.runtime.memory import GIB
from waker.state import ModelState

UNUSED = MemoryReading(None, None, "unused")
NODES = resolve_nodes({"local": NodeConfig(total_gb=128, unified_memory=False)}, local=lambda: UNUSED,
                      remote=lambda url: UNUSED)


def garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a database, " * 512)
    return path


def bad_paths(tmp_path: Path) -> list[Path]:
    """A file of garbage, and a path under a regular file (no directory can be made there, root or not)."""
    (tmp_path / "a-file").write_text("")
    return [garbage(tmp_path / "garbage.sqlite3"), tmp_path / "a-file" / "stats.sqlite3"]


def test_a_file_that_is_not_a_database_or_cannot_be_made_is_said_plainly(tmp_path: Path) -> None:
    for path in bad_paths(tmp_path):
        with pytest.raises(StoreUnavailable, match=str(path)):
            SampleStore(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_directory_is_said_plainly(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailable, match="unable to open"):
            SampleStore(locked / "stats.sqlite3")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("which", [0, 1], ids=["garbage", "under a file"])
async def test_the_gateway_runs_without_stats_when_its_database_cannot_be_opened(
        tmp_path: Path, which: int, caplog: pytest.LogCaptureFixture) -> None:
    db = bad_paths(tmp_path)[which]
    models = write_models(tmp_path / "models", fake_engine_spec("m"))
    with caplog.at_level(logging.WARNING, logger="sparkgate.gateway"):
        async with run_gateway(models, stats_db=db, stats_interval=0.1) as gw, httpx.AsyncClient() as client:
            app = gw.server.config.app
            assert app.state.sampler is None
            assert str(db) in app.state.stats_off
            answer = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})
            assert answer.status_code == 200
            stats = (await client.get(gw.url + "/admin/state")).json()["stats"]
            assert stats["enabled"] is False and str(db) in stats["off_because"]  # operators see why
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats disabled: ")]
    assert len(said) == 1 and str(db) in said[0]


def test_loading_models_d_with_an_unreadable_database(tmp_path: Path) -> None:
    db = garbage(tmp_path / "stats.sqlite3")
    models = tmp_path / "models"
    models.mkdir()
    sleeper = {"name": "sleeper", "engine": "vllm", "model": "org/s", "memory_gb": 20, "idle_action": "sleep"}
    (models / "sleeper.yaml").write_text(yaml.safe_dump(sleeper))
    loaded = load(models, db, NODES)  # learns nothing, and says the default it took
    assert loaded.registry["sleeper"].sleep_memory_learned is False
    (models / "auto.yaml").write_text(yaml.safe_dump({"name": "auto", "command": ["x"], "memory_gb": "auto"}))
    with pytest.raises(ConfigError, match="the stats database can't be read") as refused:
        load(models, db, NODES)
    assert "declare memory_gb" in str(refused.value)


def test_sparkgate_stats_on_an_unreadable_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = garbage(tmp_path / "stats.sqlite3")
    assert stats_command([], db) == 1
    assert "can't read the samples" in capsys.readouterr().err


class FullDisk(SampleStore):
    """A store whose writes fail with `error` (SQLite's own, as on a full disk) until it is set to None."""

    error: Exception | None = sqlite3.OperationalError("database or disk is full")

    def add(self, samples: object) -> int:
        if self.error is not None:
            raise self.error
        return super().add(samples)  # type: ignore[arg-type]


async def test_a_full_disk_is_said_once_per_error_and_retried_with_a_back_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FullDisk(tmp_path / "stats.sqlite3")
    waker = FakeWaker(status("m", ModelState.READY, Container(ContainerMemory(GIB))))
    waits: list[float] = []
    script = {3: sqlite3.OperationalError("disk I/O error"), 5: None}  # after the nth wait: what the disk does

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) in script:
            store.error = script[len(waits)]
        if len(waits) == 8:
            raise asyncio.CancelledError  # the test has seen enough: end run()

    sampler = Sampler(waker, store, interval=5, nvml=False, max_backoff=30, sleep=sleep)
    with caplog.at_level(logging.WARNING, logger="sparkgate.stats"), pytest.raises(asyncio.CancelledError):
        await sampler.run()
    # Rounds 1-3 fail (full), 4-5 fail (I/O error), 6 works again.
    assert waits == [10, 20, 30, 30, 30, 5, 5, 5]
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "memory sampling failed: OperationalError: database or disk is full (said once; retrying every 30s at most)",
        "memory sampling failed: OperationalError: disk I/O error (said once; retrying every 30s at most)",
        "memory sampling works again (after: OperationalError: disk I/O error)",
    ]
    assert not any(r.exc_info for r in caplog.records)  # the machine's state, not a bug: no traceback
    assert sampler.error is None and len(store.samples()) == 3
    store.close()


async def test_an_unexpected_error_keeps_its_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeWaker):
        def describe(self):  # type: ignore[no-untyped-def]
            raise KeyError("a bug")

    async def sleep(seconds: float) -> None:
        raise asyncio.CancelledError

    with SampleStore(tmp_path / "stats.sqlite3") as store, caplog.at_level(logging.WARNING, "sparkgate.stats"):
        with pytest.raises(asyncio.CancelledError):
            await Sampler(Broken(), store, sleep=sleep).run()
    [record] = caplog.records
    assert record.exc_info is not None and "KeyError" in record.getMessage()


def test_a_database_of_an_earlier_version_is_brought_up_to_date(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE samples (ts REAL NOT NULL, model TEXT NOT NULL, phase TEXT NOT NULL, rss REAL, pss REAL,
                              cgroup REAL, gpu REAL, system_available REAL, spec_hash TEXT);
        CREATE INDEX samples_model_ts ON samples (model, ts);
        INSERT INTO samples VALUES (1, 'm', 'steady', 3.0, 2.0, NULL, 5.0, 90.0, 'h');
    """)
    old.commit()
    old.close()
    with SampleStore(path) as store:
        assert store.samples() == [Sample(1, "m", "steady", rss=3.0, pss=2.0, gpu=5.0, system_available=90.0,
                                          spec_hash="h")]
        assert store.learned_peak("m", spec_hash="h") == 7.0
        store.add([Sample(2, "m", "steady", cgroup=9.0, spec_hash="h", declared_gb=12.0)])
        assert store.footprints()["m"].declared_gb == 12.0
    with SampleStore(path) as again:  # opening it once more changes nothing
        assert len(again.samples()) == 2
