"""The sampler reads a waker's read model (WakerStatus) and engines through their protocols: real processes, a
stand-in NVML and stand-in container engines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from stats.learned import learned_memory_gb
from stats.sampler import Sampler
from stats.store import Sample, SampleStore
from tests.stats.conftest import (
    MIB,
    NVML_ERROR_NOT_SUPPORTED,
    Container,
    FakeNvml,
    FakeWaker,
    Hog,
    ProcessGroup,
    status,
)
from waker.clock import FakeClock
from waker.runtime.base import ContainerMemory, RuntimeUnavailable
from waker.runtime.external import ExternalHandle
from waker.runtime.memory import GIB
from waker.state import ModelState
from waker.status import WakerStatus

S = ModelState


@pytest.fixture
def store(tmp_path: Path) -> SampleStore:
    with SampleStore(tmp_path / "stats.sqlite3") as opened:
        yield opened


async def test_a_ready_engine_process_is_sampled(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(200)
    clock = FakeClock()
    sampler = Sampler(FakeWaker(status("m", S.READY, ProcessGroup(hog.pid))), store, clock=clock, nvml=False)
    [sample] = await sampler.sample_once()
    assert sample.model == "m" and sample.phase == "steady" and sample.ts == clock.wall()
    assert sample.rss is not None and sample.rss >= 190 * MIB / GIB
    assert sample.pss is not None and sample.pss >= 190 * MIB / GIB
    assert sample.cgroup is None and sample.gpu is None
    assert sample.system_available is not None and sample.system_available > 0
    assert store.samples() == [sample]


async def test_phases_follow_the_state_and_only_running_engines_count(
        memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(20)
    engine = ProcessGroup(hog.pid)
    models = [status(state.value, state, engine) for state in ModelState]
    models.append(status("no-engine", S.READY, None))
    models.append(status("external", S.READY, ExternalHandle("http://x/v1")))  # nothing of ours to read
    samples = await Sampler(FakeWaker(*models), store, nvml=False).sample_once()
    assert {s.model: s.phase for s in samples} == {
        "starting": "load", "waking": "load", "ready": "steady", "sleeping": "sleep"}


async def test_an_engine_gone_since_the_state_check_gives_no_sample(
        memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(1)
    hog.kill()
    sampler = Sampler(FakeWaker(status("m", S.READY, ProcessGroup(hog.pid))), store, nvml=False)
    assert await sampler.sample_once() == []
    assert await Sampler(FakeWaker(), store).sample_once() == []
    assert store.samples() == []


async def test_gpu_memory_of_the_engine_group_from_nvml(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10, children=1)
    nvml = FakeNvml(devices=[[(hog.pid, 6 * GIB), (999_999_999, 40 * GIB)], [(hog.pid, 2 * GIB)]])
    [sample] = await Sampler(FakeWaker(status("m", S.STARTING, ProcessGroup(hog.pid))), store,
                             nvml=nvml).sample_once()
    assert sample.gpu == 8.0  # its own processes on both GPUs, not the other one
    assert sample.footprint == pytest.approx(sample.pss + 8.0)


async def test_gpu_not_supported_records_unknown(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10)
    nvml = FakeNvml(devices=[NVML_ERROR_NOT_SUPPORTED])  # GB10
    [sample] = await Sampler(FakeWaker(status("m", S.READY, ProcessGroup(hog.pid))), store, nvml=nvml).sample_once()
    assert sample.gpu is None and sample.pss is not None


async def test_samples_carry_the_spec_hash_the_budget_learns_by(
        memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10)
    model = status("m", S.READY, ProcessGroup(hog.pid))
    [sample] = await Sampler(FakeWaker(model), store, nvml=False).sample_once()
    assert sample.spec_hash == model.spec.spec_hash()
    assert learned_memory_gb(store, "m", spec_hash=model.spec.spec_hash()) is not None


async def test_containers_are_read_through_their_engine(store: SampleStore) -> None:
    running = Container(ContainerMemory(2 * GIB, pids=(4242,)))
    gone = Container(RuntimeUnavailable("Docker on node 'local' is unreachable"))
    remote = Container(ContainerMemory(GIB, pids=(4242,)))
    spanning = Container(ContainerMemory(3 * GIB, pids=(4242,)))
    nvml = FakeNvml(devices=[[(4242, 4 * GIB)]])
    waker = FakeWaker(status("c", S.WAKING, running, placed=("local",)), status("gone", S.READY, gone),
                      status("remote", S.READY, remote, placed=("spark2",)),
                      status("spanning", S.READY, spanning, placed=("local", "spark2")))
    samples = await Sampler(waker, store, nvml=nvml).sample_once()
    by_model = {s.model: s for s in samples}
    assert set(by_model) == {"c", "remote", "spanning"}
    assert by_model["c"] == Sample(by_model["c"].ts, "c", "load", cgroup=2.0, gpu=4.0,
                                   system_available=by_model["c"].system_available, spec_hash=by_model["c"].spec_hash,
                                   declared_gb=0.0)  # memory_gb left out: the budget holds 0 for it
    assert by_model["c"].footprint == 6.0
    # NVML and MemAvailable are this machine's: not for another host's engines, nor a model spanning nodes.
    for name in ("remote", "spanning"):
        assert by_model[name].gpu is None and by_model[name].system_available is None
    assert by_model["remote"].cgroup == 1.0
    assert (running.asked_pids, remote.asked_pids, spanning.asked_pids) == ([True], [False], [False])


async def test_container_pids_are_not_asked_for_without_gpu_readings(store: SampleStore) -> None:
    engine = Container(ContainerMemory(GIB, pids=(4242,)))
    [sample] = await Sampler(FakeWaker(status("c", S.READY, engine)), store, nvml=False).sample_once()
    assert sample.cgroup == 1.0 and engine.asked_pids == [False]


async def test_run_samples_until_closed_survives_a_bad_round_and_prunes(
        memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10)
    clock = FakeClock()
    store.add([Sample(clock.wall() - 200, "m", "steady", rss=1.0)])  # older than the retention

    class FlakyWaker(FakeWaker):
        calls = 0

        def describe(self) -> WakerStatus:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("one bad round")
            return super().describe()

    waker = FlakyWaker(status("m", S.READY, ProcessGroup(hog.pid)))
    sampler = Sampler(waker, store, interval=0.02, clock=clock, nvml=False, retention=100)
    sampler.start()
    sampler.start()  # idempotent
    try:
        async with asyncio.timeout(10):
            while len(store.samples()) < 3:
                await asyncio.sleep(0.02)
    finally:
        await sampler.close()
    await sampler.close()  # idempotent
    assert waker.calls >= 3
    assert all(s.ts == clock.wall() for s in store.samples())  # the old one was pruned


def test_the_interval_must_be_positive(store: SampleStore) -> None:
    with pytest.raises(ValueError):
        Sampler(FakeWaker(), store, interval=0)
