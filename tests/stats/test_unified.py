"""Footprints on unified memory: what MemAvailable loses over a start that ran alone on its machine, and every way a
start stops being alone (stats/unified.py), as a sequence of rounds fed to the pure StartWatch."""

from __future__ import annotations

import pytest

from stats.store import Drop
from stats.unified import HERE, MachineRound, Seen, StartWatch, machine_rounds, unified_machines
from tests.stats.conftest import status
from waker.config.nodes import NodeConfig
from waker.state import ModelState
from waker.status import NodeStatus, WakerStatus

S = ModelState
T0 = 1_700_000_000.0
STOPPED = Seen(S.STOPPED, False, "local", "h")
STARTING = Seen(S.STARTING, True, "local", "h")
READY = Seen(S.READY, True, "local", "h")
SLEEPING = Seen(S.SLEEPING, True, "local", "h")
WAKING = Seen(S.WAKING, True, "local", "h")
STOPPING = Seen(S.STOPPING, True, "local", "h")
FAILED = Seen(S.FAILED, False, "local", "h")


def feed(watch: StartWatch, *rounds: tuple[float | None, dict[str, Seen]], step: float = 5.0,
         settled: bool = True) -> list[Drop]:
    """Rounds of this machine, `step` seconds apart from T0; every drop the watch returned. `settled`: the machine
    was as in the first round one round earlier too (a baseline must follow a quiet, steady round)."""
    drops: list[Drop] = []
    if settled:
        drops += watch.observe(T0 - step, {HERE: MachineRound(*rounds[0])})
    for i, (available, models) in enumerate(rounds):
        drops += watch.observe(T0 + i * step, {HERE: MachineRound(available, models)})
    return drops


def test_a_lone_start_is_what_memavailable_lost_from_before_it_to_its_lowest_point() -> None:
    watch = StartWatch(settle=10)
    other = {"other": READY}  # running all along: unchanged, so it does not disturb the watch
    drops = feed(watch,
                 (100.0, {"m": STOPPED, **other}),
                 (90.0, {"m": STARTING, **other}),
                 (40.0, {"m": STARTING, **other}),  # vLLM's profiling run: the lowest point
                 (45.0, {"m": READY, **other}),
                 (44.0, {"m": READY, **other}),
                 (43.0, {"m": READY, **other}),  # 10 s after READY: the watch ends here
                 (10.0, {"m": READY, **other}))  # not watched any more
    assert drops == [Drop(ts=T0 + 25, started=T0, model="m", node="local", baseline=100.0, lowest=40.0,
                          spec_hash="h")]
    assert drops[0].gib == 60.0
    assert watch.watching(HERE) is None


def test_a_start_seen_only_once_ready_still_counts() -> None:
    drops = feed(StartWatch(settle=0), (100.0, {}), (30.0, {"m": READY}))  # not placed before: had no engine
    assert [d.gib for d in drops] == [70.0]


def test_a_failed_model_restarted_counts_like_a_stopped_one() -> None:
    drops = feed(StartWatch(settle=5), (100.0, {"m": FAILED}), (50.0, {"m": STARTING}), (40.0, {"m": READY}),
                 (41.0, {"m": READY}))
    assert [d.gib for d in drops] == [60.0]


@pytest.mark.parametrize("interloper", [
    pytest.param({"b": STARTING}, id="another start"),
    pytest.param({"b": READY}, id="another model appeared ready"),
    pytest.param({"b": WAKING}, id="a wake"),
])
def test_an_operation_of_another_model_while_loading_discards_the_start(interloper: dict[str, Seen]) -> None:
    watch = StartWatch(settle=10)
    drops = feed(watch, (100.0, {}), (80.0, {"m": STARTING}), (30.0, {"m": STARTING, **interloper}),
                 (20.0, {"m": READY, **interloper}), (20.0, {"m": READY, **interloper}),
                 (20.0, {"m": READY, **interloper}))
    assert drops == []


def test_a_stop_elsewhere_while_loading_discards_the_start() -> None:
    # The stop gives memory back while m takes it: the drop would understate m, the unsafe side.
    drops = feed(StartWatch(settle=5), (100.0, {"b": READY}), (80.0, {"m": STARTING, "b": READY}),
                 (90.0, {"m": STARTING, "b": STOPPING}), (95.0, {"m": READY}), (95.0, {"m": READY}))
    assert drops == []


def test_a_sleep_elsewhere_while_loading_discards_the_start() -> None:
    drops = feed(StartWatch(settle=5), (100.0, {"b": READY}), (80.0, {"m": STARTING, "b": READY}),
                 (85.0, {"m": STARTING, "b": SLEEPING}), (60.0, {"m": READY, "b": SLEEPING}),
                 (60.0, {"m": READY, "b": SLEEPING}))
    assert drops == []


def test_a_change_elsewhere_after_ready_ends_the_watch_with_the_clean_rounds() -> None:
    drops = feed(StartWatch(settle=60), (100.0, {}), (70.0, {"m": STARTING}), (50.0, {"m": READY}),
                 (48.0, {"m": READY}), (20.0, {"m": READY, "b": STARTING}))  # b's load is not m's
    assert [(d.baseline, d.lowest, d.ts) for d in drops] == [(100.0, 48.0, T0 + 20)]


def test_no_start_is_watched_while_another_operation_runs_or_when_two_begin_together() -> None:
    assert feed(StartWatch(settle=0), (100.0, {"b": STOPPING}), (60.0, {"m": READY, "b": STOPPING})) == []
    assert feed(StartWatch(settle=0), (100.0, {"b": READY}), (60.0, {"m": READY})) == []  # b went meanwhile
    assert feed(StartWatch(settle=0), (100.0, {}), (20.0, {"m": READY, "b": READY})) == []  # both at once
    assert feed(StartWatch(settle=0), (100.0, {"b": STARTING}), (60.0, {"m": READY, "b": STARTING})) == []


def test_wakes_adoptions_spanning_models_and_the_first_round_are_not_starts() -> None:
    assert feed(StartWatch(settle=0), (100.0, {"m": SLEEPING}), (60.0, {"m": WAKING}), (50.0, {"m": READY})) == []
    adopted = StartWatch(settle=0, adopted=lambda model: model == "m")
    assert feed(adopted, (100.0, {"m": STOPPED}), (100.0, {"m": READY})) == []
    spanning = Seen(S.READY, True, "local", "h", spans=True)
    assert feed(StartWatch(settle=0), (100.0, {}), (60.0, {"m": spanning})) == []
    assert feed(StartWatch(settle=0), (60.0, {"m": READY}), (60.0, {"m": READY})) == []  # up before we looked


def test_a_start_that_fails_or_is_stopped_before_ready_gives_nothing() -> None:
    assert feed(StartWatch(settle=5), (100.0, {}), (70.0, {"m": STARTING}), (100.0, {"m": FAILED})) == []
    assert feed(StartWatch(settle=5), (100.0, {}), (70.0, {"m": STARTING}), (80.0, {"m": STOPPING})) == []
    assert feed(StartWatch(settle=5), (100.0, {}), (70.0, {"m": STARTING}), (80.0, {})) == []


def test_a_missing_reading_discards_the_start_and_a_drop_of_nothing_is_not_recorded() -> None:
    assert feed(StartWatch(settle=5), (100.0, {}), (70.0, {"m": STARTING}), (None, {"m": STARTING}),
                (60.0, {"m": READY}), (60.0, {"m": READY})) == []
    assert feed(StartWatch(settle=5), (None, {}), (70.0, {"m": READY}), (70.0, {"m": READY})) == []
    # Something outside the gateway gave more back than m took: m's figure would be nonsense.
    assert feed(StartWatch(settle=0), (100.0, {}), (101.0, {"m": READY})) == []


def test_a_baseline_right_after_an_operation_or_while_memory_comes_back_is_not_used() -> None:
    # Evicted just before: `b` stopped in the round before the baseline.
    assert feed(StartWatch(settle=0), (60.0, {"b": STOPPING}), (100.0, {}), (30.0, {"m": READY}),
                settled=False) == []
    # `b` was gone between the two rounds before the start, and its memory was still coming back.
    assert feed(StartWatch(settle=0), (60.0, {"b": READY}), (100.0, {}), (30.0, {"m": READY}), settled=False) == []
    assert feed(StartWatch(settle=0), (98.0, {}), (100.0, {}), (30.0, {"m": READY}), settled=False) == []
    # Steady (a rise under STEADY_GIB, or a fall: something else took memory, the drop can only grow).
    assert [d.gib for d in feed(StartWatch(settle=0), (99.5, {}), (100.0, {}), (30.0, {"m": READY}),
                                settled=False)] == [70.0]
    assert [d.gib for d in feed(StartWatch(settle=0), (110.0, {}), (100.0, {}), (30.0, {"m": READY}),
                                settled=False)] == [70.0]
    # Nothing is known before the first two rounds.
    assert feed(StartWatch(settle=0), (100.0, {}), (30.0, {"m": READY}), settled=False) == []


def test_machines_are_watched_apart() -> None:
    watch = StartWatch(settle=0)
    quiet = MachineRound(50.0, {})
    assert watch.observe(T0 - 5, {HERE: MachineRound(100.0, {}), "spark2": quiet}) == []
    assert watch.observe(T0, {HERE: MachineRound(100.0, {}), "spark2": quiet}) == []
    drops = watch.observe(T0 + 5, {HERE: MachineRound(60.0, {"m": READY}),
                                   "spark2": MachineRound(20.0, {"n": Seen(S.READY, True, "spark2", "h")})})
    assert sorted((d.model, d.node, d.gib) for d in drops) == [("m", "local", 40.0), ("n", "spark2", 30.0)]


def test_local_nodes_are_one_machine_and_remote_ones_are_read_through_their_docker_probe() -> None:
    nodes = {"local": NodeConfig(unified_memory=True), "gpu": NodeConfig(unified_memory=True,
                                                                         docker_host="unix:///run/other.sock"),
             "spark2": NodeConfig(unified_memory=True, docker_host="ssh://me@spark2"),
             "spark3": NodeConfig(unified_memory=True, docker_host="ssh://me@spark3"),
             "box": NodeConfig(unified_memory=False, docker_host="tcp://box:2375"),
             "unknown": NodeConfig(docker_host="tcp://u:2375")}
    machines = unified_machines(nodes)
    assert machines == {"local": HERE, "gpu": HERE, "spark2": "spark2", "spark3": "spark3"}

    def node(name: str, free: float | None, probe: str) -> NodeStatus:
        return NodeStatus(name, 128, 128, 0, 0, 0, free, probe, 0)

    waker = WakerStatus(now=0, models=(
        status("a", S.READY, object(), placed=("local",)), status("b", S.STARTING, None, placed=("gpu",)),
        status("c", S.READY, object(), placed=("spark2",)), status("d", S.READY, object(), placed=("box",)),
        status("e", S.STOPPED, None)), nodes=(
        node("local", 70.0, "meminfo"), node("spark2", 33.0, "docker (ssh://me@spark2)"),
        node("spark3", 40.0, "none")), routes={})
    rounds = machine_rounds(waker, machines, here=77.0)
    assert rounds[HERE].available == 77.0  # this machine's own reading, not the node probe's
    assert set(rounds[HERE].models) == {"a", "b"}
    assert rounds[HERE].models["b"] == Seen(S.STARTING, False, "gpu", rounds[HERE].models["b"].spec_hash)
    assert (rounds["spark2"].available, set(rounds["spark2"].models)) == (33.0, {"c"})
    assert (rounds["spark3"].available, dict(rounds["spark3"].models)) == (None, {})  # no probe of MemAvailable
