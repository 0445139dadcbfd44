"""The sampler with duck-typed controllers around real processes (and a stand-in NVML and Docker node)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stats.learned import learned_memory_gb
from stats.sampler import Sampler
from stats.store import Sample, SampleStore
from tests.stats.conftest import MIB, NVML_ERROR_NOT_SUPPORTED, FakeNvml, Hog
from waker.clock import FakeClock
from waker.config.spec import ModelSpec
from waker.runtime.memory import GIB
from waker.state import ModelState

S = ModelState


def controller(name: str, state: ModelState | str, handle: Any) -> SimpleNamespace:
    return SimpleNamespace(spec=SimpleNamespace(name=name), state=state, handle=handle)


def waker_of(*controllers: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(controllers=lambda: list(controllers))


@pytest.fixture
def store(tmp_path: Path) -> SampleStore:
    with SampleStore(tmp_path / "stats.sqlite3") as opened:
        yield opened


async def test_a_ready_engine_process_is_sampled(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(200)
    clock = FakeClock()
    sampler = Sampler(waker_of(controller("m", S.READY, SimpleNamespace(pid=hog.pid))), store, clock=clock,
                      nvml=False)
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
    handle = SimpleNamespace(pid=hog.pid)
    controllers = [controller(state.value, state, handle) for state in ModelState]
    controllers.append(controller("no-handle", S.READY, None))
    controllers.append(controller("external", S.READY, SimpleNamespace(api_base="http://x/v1")))
    controllers.append(controller("plain-string-state", "ready", handle))
    samples = await Sampler(waker_of(*controllers), store, nvml=False).sample_once()
    assert {s.model: s.phase for s in samples} == {
        "starting": "load", "waking": "load", "ready": "steady", "sleeping": "sleep", "plain-string-state": "steady"}


async def test_an_engine_gone_since_the_state_check_gives_no_sample(
        memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(1)
    hog.kill()
    sampler = Sampler(waker_of(controller("m", S.READY, SimpleNamespace(pid=hog.pid))), store, nvml=False)
    assert await sampler.sample_once() == []
    assert await Sampler(waker_of(), store).sample_once() == []
    assert store.samples() == []


async def test_gpu_memory_of_the_engine_group_from_nvml(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10, children=1)
    nvml = FakeNvml(devices=[[(hog.pid, 6 * GIB), (999_999_999, 40 * GIB)], [(hog.pid, 2 * GIB)]])
    [sample] = await Sampler(waker_of(controller("m", S.STARTING, SimpleNamespace(pid=hog.pid))), store,
                             nvml=nvml).sample_once()
    assert sample.gpu == 8.0  # its own processes on both GPUs, not the other one
    assert sample.footprint == pytest.approx(sample.pss + 8.0)


async def test_gpu_not_supported_records_unknown(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10)
    nvml = FakeNvml(devices=[NVML_ERROR_NOT_SUPPORTED])  # GB10
    [sample] = await Sampler(waker_of(controller("m", S.READY, SimpleNamespace(pid=hog.pid))), store,
                             nvml=nvml).sample_once()
    assert sample.gpu is None and sample.pss is not None


async def test_a_real_waker_shape_records_the_spec_hash(memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    """Waker has `registry` (a mapping of names) and `controller(name)`."""
    hog = memory_hog(10)
    spec = ModelSpec(name="m", command=["engine"])
    ctl = SimpleNamespace(spec=spec, state=S.READY, handle=SimpleNamespace(pid=hog.pid))
    waker = SimpleNamespace(registry={"m": spec}, controller=lambda name: ctl)
    [sample] = await Sampler(waker, store, nvml=False).sample_once()
    assert sample.spec_hash == spec.spec_hash()
    assert learned_memory_gb(store, "m", spec_hash=spec.spec_hash()) is not None


class FakeNode:
    """Like DockerHandle._node: `call(fn)` runs fn(client) off the loop."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        return await asyncio.to_thread(fn, self.client)


def docker_handle(memory_stats: dict[str, Any] | Exception, pids: list[int]) -> SimpleNamespace:
    def stats(container_id: str, stream: bool, one_shot: bool = False) -> dict[str, Any]:
        if isinstance(memory_stats, Exception):
            raise memory_stats
        return {"memory_stats": memory_stats}

    api = SimpleNamespace(stats=stats, top=lambda cid: {"Titles": ["UID", "PID", "CMD"],
                                                        "Processes": [["root", str(p), "x"] for p in pids]})
    return SimpleNamespace(container_id="c0ffee", _node=FakeNode(SimpleNamespace(api=api)))


async def test_containers_are_read_through_their_node(store: SampleStore) -> None:
    running = docker_handle({"usage": 3 * GIB, "stats": {"inactive_file": GIB}}, pids=[4242])
    gone = docker_handle(RuntimeError("404 no such container"), pids=[])
    remote = docker_handle({"usage": GIB}, pids=[4242])
    remote_ctl = controller("remote", S.READY, remote)
    remote_ctl.spec.node = "spark2"  # NVML and MemAvailable are this machine's: not for another host's engines
    nvml = FakeNvml(devices=[[(4242, 4 * GIB)]])
    samples = await Sampler(waker_of(controller("c", S.WAKING, running), controller("gone", S.READY, gone),
                                     remote_ctl), store, nvml=nvml).sample_once()
    by_model = {s.model: s for s in samples}
    assert set(by_model) == {"c", "remote"}
    assert by_model["c"] == Sample(by_model["c"].ts, "c", "load", cgroup=2.0, gpu=4.0,
                                   system_available=by_model["c"].system_available)
    assert by_model["c"].footprint == 6.0
    assert by_model["remote"].cgroup == 1.0
    assert by_model["remote"].gpu is None and by_model["remote"].system_available is None


async def test_run_samples_until_closed_survives_a_bad_round_and_prunes(
        memory_hog: Callable[..., Hog], store: SampleStore) -> None:
    hog = memory_hog(10)
    clock = FakeClock()
    store.add([Sample(clock.wall() - 200, "m", "steady", rss=1.0)])  # older than the retention
    calls = 0

    def controllers() -> list[SimpleNamespace]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("one bad round")
        return [controller("m", S.READY, SimpleNamespace(pid=hog.pid))]

    sampler = Sampler(SimpleNamespace(controllers=controllers), store, interval=0.02, clock=clock, nvml=False,
                      retention=100)
    sampler.start()
    sampler.start()  # idempotent
    try:
        async with asyncio.timeout(10):
            while len(store.samples()) < 3:
                await asyncio.sleep(0.02)
    finally:
        await sampler.close()
    await sampler.close()  # idempotent
    assert calls >= 3
    assert all(s.ts == clock.wall() for s in store.samples())  # the old one was pruned


def test_the_interval_must_be_positive(store: SampleStore) -> None:
    with pytest.raises(ValueError):
        Sampler(waker_of(), store, interval=0)
