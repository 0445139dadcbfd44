"""The stats sampler inside a running gateway, `sparkgate stats`, and `memory_gb: auto`."""

import asyncio
from pathlib import Path

import httpx
import pytest

from gateway.cli import main as cli
from gateway.config import load_models
from stats import SampleStore
from tests.harness import fake_engine_spec, run_gateway, write_models
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError


async def test_running_gateway_samples_engines_and_auto_memory_uses_the_learned_peak(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "stats.sqlite3"
    models = write_models(tmp_path / "m", fake_engine_spec("sampled", "--alloc-mb", "150", memory_gb=1))
    async with run_gateway(models, stats_db=db, stats_interval=0.2) as gw, httpx.AsyncClient(timeout=30) as client:
        await client.post(gw.v1 + "/chat/completions", json={"model": "sampled", "messages": []})
        for _ in range(100):  # the sampler writes every 0.2 s: wait for a sample taken while READY
            store = SampleStore(db)
            footprint = store.footprints().get("sampled")
            learned = store.learned_peak("sampled")
            store.close()
            if learned is not None:
                break
            await asyncio.sleep(0.1)
        assert footprint is not None and footprint.peak >= 150 / 1024

    assert await asyncio.to_thread(cli, ["stats"]) in (0, 1)  # the default DB: may be empty
    from stats.cli import stats_command

    assert stats_command([], db) == 0
    out = capsys.readouterr().out
    assert "sampled" in out

    # memory_gb: auto takes the learned peak x 1.2 (per-engine samples count where memory is not unified: on a DGX
    # Spark only a start's MemAvailable drop does, which a 150 MB engine doesn't make)
    discrete = {"local": NodeConfig(total_gb=128, unified_memory=False)}
    write_models(models, fake_engine_spec("sampled", "--alloc-mb", "150", memory_gb="auto"))
    registry = load_models(models, db, discrete)
    assert registry["sampled"].memory_gb >= round(150 / 1024 * 1.2, 1)
    write_models(models, fake_engine_spec("never-seen", memory_gb="auto"))
    with pytest.raises(ConfigError, match="never-seen has no learned footprint yet"):
        load_models(models, db, discrete)
