"""No test writes the user's own stats database (tests/conftest.py): gateways started by tests, in this process or as
a `sparkgate serve` subprocess, and `sparkgate stats`, all use the run's temporary file.

Before that, the chaos tests' subprocess gateways inherited the user's environment and wrote their Docker models
(`dk-...`) into `~/.local/state/sparkgate/stats.sqlite3`, where `sparkgate stats` and `memory_gb: auto` read them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from gateway.cli import main as cli
from gateway.settings import GatewaySettings
from stats.store import SampleStore
from tests.chaos.util import GatewayProcess, free_port
from tests.harness import fake_engine_spec, run_gateway, write_models


def users_own_stats_file(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Where the user's stats would go with HOME at `home`: GatewaySettings' default, without the suite's override."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    with monkeypatch.context() as without:
        without.delenv("SPARKGATE_STATS_DB", raising=False)
        path = GatewaySettings().stats_db
    assert path == home / ".local" / "state" / "sparkgate" / "stats.sqlite3"
    return path


async def test_gateways_started_by_tests_leave_the_users_stats_file_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = users_own_stats_file(monkeypatch, tmp_path / "home")
    used = GatewaySettings().stats_db  # what a gateway started now uses: the run's own file
    models = write_models(tmp_path / "models", fake_engine_spec("isolated"))
    gateway = GatewayProcess(models, free_port(), {"SPARKGATE_NODES": '{"local": {"memory_probe": "none"}}',
                                                   "SPARKGATE_STATS_INTERVAL": "0.1"})
    await gateway.start()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(gateway.v1 + "/chat/completions", json={"model": "isolated", "messages": []})
            assert answer.status_code == 200
        async with asyncio.timeout(20):  # another process writes it: nothing to await but the file
            while not await asyncio.to_thread(sampled, used, "isolated"):
                await asyncio.sleep(0.1)
    finally:
        await gateway.kill()
    async with run_gateway(models, stats_interval=0.1):  # in this process too
        pass
    assert await asyncio.to_thread(cli, ["stats"]) in (0, 1)
    assert not users.exists() and not users.parent.exists()
    assert os.environ["SPARKGATE_STATS_DB"] == str(used)


def sampled(db: Path, model: str) -> bool:
    if not db.exists():
        return False
    with SampleStore(db) as store:
        return bool(store.samples(model))
