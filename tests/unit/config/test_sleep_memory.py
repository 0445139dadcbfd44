"""The default sleeping footprint: what an engine keeps after a sleep, on the safe side until the stats know better."""

from __future__ import annotations

from typing import Any

import pytest

from waker.config.spec import ModelSpec


def sleeper(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": "vllm", "model": "org/m", "idle_action": "sleep",
                                     **fields})


@pytest.mark.parametrize(("memory_gb", "held"), [(40, 4.0), (3, 3.0), (0, 0.0)])
def test_level_2_keeps_up_to_4_gb(memory_gb: float, held: float) -> None:
    # vLLM measured 2.75-4.2 GiB after a level-2 sleep on an H100: the old default, 2, promised the rest away.
    assert sleeper(memory_gb=memory_gb).sleeping_gb == held


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_level_1_keeps_the_weights_so_counts_the_whole_footprint(engine: str) -> None:
    assert sleeper(engine=engine, memory_gb=40, sleep_level=1).sleeping_gb == 40


def test_a_declared_sleeping_footprint_wins() -> None:
    assert sleeper(memory_gb=40, sleep_memory_gb=2.5).sleeping_gb == 2.5
    assert sleeper(memory_gb=40, sleep_level=1, sleep_memory_gb=12).sleeping_gb == 12


def test_the_marks_set_at_load_are_policy_and_never_written_out() -> None:
    plain = sleeper(memory_gb=40)
    marked = plain.model_copy(update={"sleep_memory_gb": 3.0, "sleep_memory_learned": True,
                                      "gpu_memory_utilization": 0.31, "memory_fraction_derived": True})
    assert marked.spec_hash() == sleeper(memory_gb=40, gpu_memory_utilization=0.31).spec_hash()
    dumped = marked.model_dump()
    assert "sleep_memory_learned" not in dumped and "memory_fraction_derived" not in dumped
