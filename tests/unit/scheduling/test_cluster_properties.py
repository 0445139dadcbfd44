"""Property tests over random traces on three nodes, through the real waker (cluster admission, per-node
plans) with fake engines and a fake clock: no node's ledger ever exceeds its budget, a spanning model
holds its share on each of its nodes, and every request is answered in bounded time."""

import asyncio
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeEngineApi, FakeRuntime
from tests.unit.scheduling.test_admission_properties import Req, drive
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.waker import Waker

NODES = {"a": 100.0, "b": 60.0, "c": 100.0}
TICKS_LIMIT = 600

# (size GB, where): where 0 = any node, 1-3 = only that node, 4 = spans two nodes of a and c
model_st = st.tuples(st.integers(5, 55), st.integers(0, 4))
models_st = st.lists(model_st, min_size=2, max_size=6)
trace_st = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5), st.integers(0, 6)), min_size=1, max_size=40)


def model_spec(i: int, gb: int, where: int) -> ModelSpec:
    fields: dict[str, object] = {"name": f"m{i}", "runtime": "docker", "image": "img", "memory_gb": gb,
                                 "min_uptime": 0, "idle_timeout": 5, "engine": "generic"}
    if 1 <= where <= 3:
        fields["node"] = "abc"[where - 1]
    elif where == 4:
        fields.update(engine="vllm", model="w", nodes=2, node=["a", "c"])
    return ModelSpec.model_validate(fields)


async def replay(models: list[tuple[int, int]], trace: list[tuple[int, int, int]], max_hold: int) -> None:
    specs = [model_spec(i, gb, where) for i, (gb, where) in enumerate(models)]
    requests = [Req(at, model % len(specs), dur) for at, model, dur in trace]
    runtime = FakeRuntime()
    clock = FakeClock()
    waker = Waker(Registry(specs), runtimes={RuntimeKind.DOCKER: runtime},
                  budgets={n: Budget(gb, 0) for n, gb in NODES.items()},
                  probes={n: FixedProbe(None) for n in NODES}, clock=clock, engine_api=FakeEngineApi(runtime),
                  queue=QueuePolicy(max_hold=max_hold, max_wait=3600, poll_interval=3600))
    def within_budgets(tick: int) -> None:
        for name, admission in waker.admissions.items():
            assert admission.held_gb() <= NODES[name], f"node {name} over budget at tick {tick}"
        for controller in waker.controllers():
            if controller.spec.nodes == 2 and controller.state.value in ("starting", "ready"):
                assert {n: a.held_by(controller.name) for n, a in waker.admissions.items() if n != "b"} == {
                    "a": controller.spec.memory_gb, "c": controller.spec.memory_gb}

    outcomes, _ = await drive(waker, clock, requests, within_budgets, TICKS_LIMIT)
    for admission in waker.admissions.values():
        assert admission.high_water_gb <= admission.budget.capacity_gb

    assert set(outcomes) == set(range(len(requests)))  # none lost
    assert set(outcomes.values()) == {"answered"}  # nothing pinned: every model can always run somewhere


@settings(max_examples=int(os.environ.get("SPARKGATE_TRACE_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(models=models_st, trace=trace_st, max_hold=st.integers(0, 10))
def test_random_traces_on_three_nodes_are_all_served_within_every_budget(
        models: list[tuple[int, int]], trace: list[tuple[int, int, int]], max_hold: int) -> None:
    # "b" has 60 GB: a model restricted to it must fit there.
    models = [(min(gb, 55), where) for gb, where in models]
    asyncio.run(replay(models, trace, max_hold))
