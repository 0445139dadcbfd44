"""The scheduler's decisions, from snapshots alone: table-driven cases and the victim choice."""

import pytest

from waker.scheduling.plan import ModelView, Plan, Snapshot, Ticket, choose_victims, plan
from waker.state import ModelState

S = ModelState


def m(name: str, state: ModelState = S.STOPPED, gb: float = 10, *, held: float | None = None, in_flight: int = 0,
      last_used: float = 0, pinned: bool = False, priority: int = 0, waiting: int = 0) -> ModelView:
    if held is None:
        held = gb if state in (S.STARTING, S.READY, S.STOPPING, S.WAKING) else 0.0
    return ModelView(name, state, gb, held, in_flight, waiting, last_used, pinned, priority)


def snap(*models: ModelView, queue: tuple[str, ...] = (), capacity: float = 100, live: float | None = None,
         now: float = 1000, since: float = 1000, max_hold: float = 60) -> Snapshot:
    views = {v.name: v for v in models}
    tickets = tuple(Ticket(name, since + i, views[name].footprint_gb - views[name].held_gb)
                    for i, name in enumerate(queue))
    return Snapshot(now=now, capacity_gb=capacity, models=views, queue=tickets, live_free_gb=live,
                    max_hold=max_hold)


def stops(p: Plan) -> list[str]:
    return [name for name, _ in p.stop]


def test_fits_starts_at_once() -> None:
    p = plan(snap(m("a", gb=40), m("b", S.READY, 50), queue=("a",)))
    assert p.admit == ("a",) and p.stop == () and p.blocked == {}


def test_live_memory_gates_a_start_the_ledger_allows() -> None:
    # Ledger: 60 free. Live: only 30 (memory of a stopped engine not back yet, or another process).
    p = plan(snap(m("a", gb=40), m("b", S.READY, 40), queue=("a",), live=30))
    assert p.admit == ()
    assert "a" in p.blocked


def test_live_memory_counts_engines_still_allocating() -> None:
    # 50 live free, but "b" is STARTING and has not allocated its 30 yet: only 20 really free.
    p = plan(snap(m("a", gb=40), m("b", S.STARTING, 30), queue=("a",), live=50))
    assert p.admit == ()


def test_evicts_least_recently_used_idle_model() -> None:
    p = plan(snap(m("new", gb=50), m("old", S.READY, 40, last_used=10), m("recent", S.READY, 40, last_used=20),
                  queue=("new",)))
    assert stops(p) == ["old"]
    assert p.admit == ()  # the start waits until "old" has really released its memory
    assert p.blocked["new"].reason == "waiting for memory to be released"


def test_fewest_victims_beat_least_recently_used() -> None:
    p = plan(snap(m("new", gb=60), m("s1", S.READY, 20, last_used=1), m("s2", S.READY, 20, last_used=2),
                  m("big", S.READY, 50, last_used=9), queue=("new",), capacity=100))
    # free 10; need 50 more: one "big" beats the two least recently used small ones (40, not enough anyway)
    assert stops(p) == ["big"]


def test_sleeping_models_are_victims_before_ready_ones() -> None:
    p = plan(snap(m("new", gb=30), m("awake", S.READY, 40, last_used=1),
                  m("asleep", S.SLEEPING, 40, held=35, last_used=99), queue=("new",), capacity=100))
    assert stops(p) == ["asleep"]


def test_priority_breaks_ties() -> None:
    p = plan(snap(m("new", gb=40), m("vip", S.READY, 40, last_used=1, priority=5),
                  m("low", S.READY, 40, last_used=2, priority=0), queue=("new",), capacity=100))
    assert stops(p) == ["low"]


def test_pinned_models_are_never_evicted() -> None:
    p = plan(snap(m("new", gb=40), m("pin", S.READY, 60, pinned=True, last_used=0), m("other", S.READY, 30),
                  queue=("new",), capacity=100))
    assert stops(p) == ["other"]


def test_model_that_can_never_fit_beside_pinned_ones_is_refused() -> None:
    p = plan(snap(m("new", gb=50), m("pin", S.READY, 60, pinned=True), queue=("new",), capacity=100))
    assert "new" in p.impossible
    assert "only 40 GB of the 100 GB budget is not held by pinned models" in p.impossible["new"]


def test_busy_models_are_drained_not_stopped() -> None:
    p = plan(snap(m("new", gb=60), m("hot", S.READY, 60, in_flight=3), queue=("new",), capacity=100,
                  since=500, max_hold=30))
    assert p.stop == ()
    assert p.drain == (("hot", 530),)
    assert p.blocked["new"].reason == "waiting for busy models to finish their requests"
    assert p.blocked["new"].holders == (("hot", 60, 3),)


def test_idle_part_is_stopped_and_busy_part_drained_when_both_are_needed() -> None:
    p = plan(snap(m("new", gb=80), m("idle", S.READY, 40), m("busy", S.READY, 40, in_flight=1),
                  queue=("new",), capacity=100))
    assert stops(p) == ["idle"]
    assert [name for name, _ in p.drain] == ["busy"]


def test_memory_already_being_released_is_not_evicted_twice() -> None:
    # "gone" is STOPPING for "new": no further victim is needed, "other" stays up.
    p = plan(snap(m("new", gb=50), m("gone", S.STOPPING, 50), m("other", S.READY, 40), queue=("new",),
                  capacity=100))
    assert p.stop == () and p.admit == ()


def test_queue_is_fifo_a_later_small_model_cannot_take_the_room_an_earlier_one_waits_for() -> None:
    p = plan(snap(m("big", gb=70), m("small", gb=10), m("hot", S.READY, 60, in_flight=1),
                  queue=("big", "small"), capacity=100))
    # 40 free: "small" alone would fit, but "big" came first and claims what is free.
    assert p.admit == ()
    assert set(p.blocked) == {"big", "small"}


def test_later_ticket_fits_when_the_earlier_one_was_admitted() -> None:
    p = plan(snap(m("a", gb=40), m("b", gb=40), m("c", gb=40), queue=("a", "b", "c"), capacity=100))
    assert p.admit == ("a", "b")
    assert "c" in p.blocked


def test_victims_of_an_earlier_ticket_are_not_promised_twice() -> None:
    p = plan(snap(m("x", gb=50), m("y", gb=50), m("v1", S.READY, 50, last_used=1),
                  m("v2", S.READY, 50, last_used=2), queue=("x", "y"), capacity=100))
    assert stops(p) == ["v1", "v2"]


def test_waking_a_sleeping_model_needs_only_the_difference() -> None:
    p = plan(snap(m("s", S.SLEEPING, 40, held=5), m("r", S.READY, 60), queue=("s",), capacity=100))
    # held: 65; needs 35 more; free 35 -> wake now
    assert p.admit == ("s",)


def test_model_still_stopping_is_not_started_until_stopped() -> None:
    p = plan(snap(m("a", S.STOPPING, 10), queue=("a",)))
    assert p.admit == () and p.blocked == {}


@pytest.mark.parametrize(("sizes", "shortfall", "expected"), [
    ({"a": 10, "b": 20, "c": 30}, 25, ["c"]),
    ({"a": 10, "b": 20, "c": 30}, 45, ["b", "c"]),
    ({"a": 10, "b": 20, "c": 30}, 61, None),
    ({"a": 10}, 0, []),
])
def test_choose_victims(sizes: dict[str, float], shortfall: float, expected: list[str] | None) -> None:
    candidates = [m(n, S.READY, gb, last_used=i) for i, (n, gb) in enumerate(sizes.items())]
    chosen = choose_victims(candidates, shortfall)
    assert (None if chosen is None else sorted(v.name for v in chosen)) == expected


def test_greedy_search_beyond_the_exact_limit_still_covers_the_shortfall() -> None:
    candidates = [m(f"m{i}", S.READY, 5 + i % 3, last_used=i) for i in range(30)]
    chosen = choose_victims(candidates, 40)
    assert chosen is not None and sum(v.held_gb for v in chosen) >= 40
    assert all(sum(v.held_gb for v in chosen) - v.held_gb < 40 for v in chosen)  # none superfluous
