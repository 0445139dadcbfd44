"""The sampler on unified memory: each cold start that ran alone is recorded as what MemAvailable lost over it, read
from the waker's own read model and events (a real Waker with fake engines, a fake clock, a MemAvailable the test
sets), and `memory_gb: auto` learns from that rather than from per-engine figures that miss CUDA's allocations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from stats.learned import learn_memory, learned_memory_gb
from stats.sampler import Sampler
from stats.store import SampleStore
from stats.unified import DEFAULT_SETTLE
from tests.fakes import FakeEngineApi, FakeHandle, FakeRuntime
from tests.stats.conftest import Container, FakeWaker, status
from waker.clock import FakeClock
from waker.config.nodes import NodeConfig
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.options import WakerOptions
from waker.runtime.base import ContainerMemory
from waker.runtime.memory import GIB, FixedProbe
from waker.scheduling.budget import Budget
from waker.state import ModelState
from waker.waker import Waker

S = ModelState
SPARK = {"local": NodeConfig(total_gb=128, unified_memory=True)}


class MemAvailable:
    """This machine's MemAvailable as the test sets it, in GiB (the sampler reads bytes)."""

    def __init__(self, gib: float) -> None:
        self.gib = gib

    def __call__(self) -> int:
        return int(self.gib * GIB)


@pytest.fixture
def store(tmp_path: Path) -> SampleStore:
    with SampleStore(tmp_path / "stats.sqlite3") as opened:
        yield opened


@asynccontextmanager
async def spark(clock: FakeClock, *names: str) -> AsyncIterator[tuple[Waker, FakeRuntime]]:
    runtime = FakeRuntime()
    specs = [ModelSpec(name=n, command=["engine"], min_uptime=0, memory_gb=10) for n in names]
    waker = Waker(Registry(specs), runtimes={RuntimeKind.PROCESS: runtime}, budgets={"local": Budget(128, 8)},
                  probes={"local": FixedProbe(None)}, clock=clock, engine_api=FakeEngineApi(runtime),
                  options=WakerOptions(reap_interval=3600))
    async with waker:
        yield waker, runtime


async def test_a_lone_cold_start_is_recorded_as_what_the_machine_lost(store: SampleStore) -> None:
    clock = FakeClock()
    free = MemAvailable(100.0)
    async with spark(clock, "m", "other") as (waker, _):
        sampler = Sampler(waker, store, clock=clock, nvml=False, nodes=SPARK, events=waker.events, available=free)
        await sampler.sample_once()
        await sampler.sample_once()  # m is stopped: the baseline, after a quiet round
        async with waker.lease("m"):
            pass
        free.gib = 35.0  # weights and KV cache, allocated by CUDA from the shared pool
        await sampler.sample_once()
        clock.advance(DEFAULT_SETTLE)
        free.gib = 36.0
        await sampler.sample_once()  # the settling minutes are over
        [drop] = store.drops()
        spec = waker.registry["m"]
        assert (drop.model, drop.node, drop.gib, drop.spec_hash) == ("m", "local", 65.0, spec.spec_hash())
        learned = learn_memory(store, "m", unified=True, spec_hash=spec.spec_hash())
        assert learned is not None and learned.gb == 78.0  # 65 x 1.2


async def test_an_adopted_engine_is_not_a_start(store: SampleStore) -> None:
    clock = FakeClock()
    free = MemAvailable(40.0)
    async with spark(clock, "m") as (waker, runtime):

        async def adopt(number: int) -> None:
            """What the waker does with an engine it finds running (Waker._take_over), e.g. on a node back from an
            outage: the machine lost its memory long ago. Returns once it is READY."""
            handle = FakeHandle(number)
            runtime.handles.append(handle)
            waker.scheduler.adopted("m", ("local",))
            waker.gate("m").controller.adopt(handle, ("local",))
            handle.ready.set()
            async with waker.lease("m"):
                pass

        sampler = Sampler(waker, store, clock=clock, nvml=False, nodes=SPARK, events=waker.events, settle=0,
                          available=free)
        await sampler.sample_once()
        await sampler.sample_once()
        await adopt(7)
        free.gib = 39.0  # a little less, for another reason
        await sampler.sample_once()
        assert waker.describe().model("m").placed == ("local",) and waker.describe().model("m").state is S.READY
        assert store.drops() == []
        # Without the waker's events the same rounds would be taken for a start of 1 GiB.
        blind = Sampler(waker, store, clock=clock, nvml=False, nodes=SPARK, settle=0, available=free)
        await waker.stop("m")
        free.gib = 40.0
        await blind.sample_once()
        await blind.sample_once()
        await adopt(8)
        free.gib = 39.0
        await blind.sample_once()
        assert [d.gib for d in store.drops()] == [1.0]


async def test_starts_that_overlap_are_not_recorded(store: SampleStore) -> None:
    clock = FakeClock()
    free = MemAvailable(100.0)
    async with spark(clock, "a", "b") as (waker, _):
        sampler = Sampler(waker, store, clock=clock, nvml=False, nodes=SPARK, events=waker.events, settle=0,
                          available=free)
        await sampler.sample_once()
        await sampler.sample_once()
        async with waker.lease("a"), waker.lease("b"):  # both started between two rounds
            pass
        free.gib = 20.0
        await sampler.sample_once()
        assert store.drops() == []


async def test_nodes_without_unified_memory_get_no_watch(store: SampleStore) -> None:
    clock = FakeClock()
    free = MemAvailable(100.0)
    async with spark(clock, "m") as (waker, _):
        sampler = Sampler(waker, store, clock=clock, nvml=False, events=waker.events, settle=0, available=free,
                          nodes={"local": NodeConfig(total_gb=128, unified_memory=False)})
        assert await sampler.sample_once() == []
        assert await sampler.sample_once() == []
        async with waker.lease("m"):
            pass
        free.gib = 20.0
        await sampler.sample_once()
        assert store.drops() == []


async def test_per_engine_samples_miss_what_cuda_takes_and_only_the_drop_is_learned_on_unified_memory(
        store: SampleStore) -> None:
    # What the GB10 shows: the container's cgroup holds the engine's host side (2 GiB), MemAvailable falls by 70.
    engine = Container(ContainerMemory(2 * GIB))
    stopped, ready = status("m", S.STOPPED, None, placed=("local",)), status("m", S.READY, engine, placed=("local",))
    waker = FakeWaker(stopped)
    clock = FakeClock()
    free = MemAvailable(100.0)
    sampler = Sampler(waker, store, clock=clock, nvml=False, nodes=SPARK, settle=0, available=free)
    await sampler.sample_once()
    await sampler.sample_once()
    waker.models = [ready]
    free.gib = 30.0
    [sample] = await sampler.sample_once()
    assert sample.footprint == 2.0 and sample.declared_gb == ready.spec.memory_gb
    spec_hash = ready.spec.spec_hash()
    assert learned_memory_gb(store, "m", spec_hash=spec_hash) == 2.4  # what `auto` learned before: a 70 GB OOM
    learned = learn_memory(store, "m", unified=True, spec_hash=spec_hash)
    assert learned is not None and learned.gb == 84.0 and learned.peak == 70.0
