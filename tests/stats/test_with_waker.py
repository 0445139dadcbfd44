"""The sampler against a real gateway's Waker: real ModelControllers with process and Docker engines."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from stats.learned import learned_memory_gb
from stats.sampler import Sampler
from stats.store import SampleStore
from tests.docker.conftest import docker_engine_spec
from tests.harness import fake_engine_spec, run_gateway, write_models


async def test_a_process_engine_through_the_waker(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models.d", fake_engine_spec("proc-model"), fake_engine_spec("cold-model"))
    async with run_gateway(models) as gw:
        async with gw.waker.lease("proc-model"):
            pass
        spec = gw.waker.registry["proc-model"]
        with SampleStore(tmp_path / "stats.sqlite3") as store:
            [sample] = await Sampler(gw.waker, store, nvml=False).sample_once()  # cold-model is stopped: skipped
            assert sample.model == "proc-model" and sample.phase == "steady"
            assert sample.spec_hash == spec.spec_hash()
            assert sample.pss is not None and sample.pss > 0.005  # a Python engine: some MiB
            assert learned_memory_gb(store, "proc-model", spec_hash=spec.spec_hash()) is not None


@pytest.mark.docker
async def test_a_docker_engine_through_the_waker(tmp_path: Path, docker_client: docker.DockerClient,
                                                 model_name: str) -> None:
    models = write_models(tmp_path / "models.d", docker_engine_spec(model_name))
    async with run_gateway(models) as gw:
        async with gw.waker.lease(model_name):
            pass
        with SampleStore(tmp_path / "stats.sqlite3") as store:
            [sample] = await Sampler(gw.waker, store, nvml=False).sample_once()
        assert sample.model == model_name and sample.phase == "steady"
        assert sample.cgroup is not None and sample.cgroup > 0.005
        assert sample.rss is None and sample.pss is None
