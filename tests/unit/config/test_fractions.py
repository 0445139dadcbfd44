"""Engine memory fractions derived from memory_gb and the node's total, the warning when both are given and
disagree, the weights' size a trtllm fraction needs, and the refusal of vLLM's sleep level 1 on unified memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from waker.config.engine_memory import fit_fraction, sleep_level_problem, weights_gb
from waker.config.spec import ModelSpec
from waker.engines.base import Launch
from waker.engines.registry import engine_for

GIB = 1024**3


def spec(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": "vllm", "model": "org/m", **fields})


def no_weights(_: ModelSpec) -> float | None:
    return None


def weighs(gb: float) -> Any:
    return lambda _: gb


def test_vllm_gets_memory_gb_over_the_total_rounded_down_and_marked() -> None:
    fit = fit_fraction(spec(memory_gb=40), [128.0], no_weights)
    assert fit.spec.gpu_memory_utilization == 0.31  # 40 / 128 = 0.3125
    assert fit.spec.memory_fraction_derived
    assert fit.notes == ("gpu_memory_utilization 0.31 (derived from memory_gb 40 of 128 GB)",)
    assert fit.warnings == ()
    # The engine is told: its command line carries the fraction, and its launch hash changes with it.
    argv = engine_for("vllm").argv(fit.spec, Launch(host="127.0.0.1", port=8000))
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.31"
    assert fit.spec.spec_hash() != spec(memory_gb=40).spec_hash()
    assert fit.spec.spec_hash() == spec(memory_gb=40, gpu_memory_utilization=0.31).spec_hash()


def test_sglang_too_and_an_exact_share_is_not_rounded_below_itself() -> None:
    fit = fit_fraction(spec(engine="sglang", memory_gb=38.4), [128.0], no_weights)
    assert fit.spec.gpu_memory_utilization == 0.3  # 0.3 exactly, not 0.29 from a float below it
    argv = engine_for("sglang").argv(fit.spec, Launch(host="127.0.0.1", port=8000))
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.3"


def test_several_nodes_take_the_largest_total_so_none_gives_more_than_memory_gb() -> None:
    fit = fit_fraction(spec(memory_gb=24), [48.0, 128.0, 96.0], no_weights)
    assert fit.spec.gpu_memory_utilization == 0.18
    for total in (48.0, 128.0, 96.0):
        assert fit.spec.gpu_memory_utilization * total <= 24


def test_fractions_stay_within_a_hundredth_and_0_95() -> None:
    assert fit_fraction(spec(memory_gb=128), [128.0], no_weights).spec.gpu_memory_utilization == 0.95
    assert fit_fraction(spec(memory_gb=0.5), [128.0], no_weights).spec.gpu_memory_utilization == 0.01


def test_trtllm_shares_what_is_free_after_the_weights() -> None:
    fit = fit_fraction(spec(engine="trtllm", memory_gb=30), [128.0], weighs(16.0))
    assert fit.spec.gpu_memory_utilization == 0.12  # (30 - 16) / (128 - 16) = 0.125
    assert 16 + fit.spec.gpu_memory_utilization * (128 - 16) <= 30
    assert fit.warnings == ()
    assert "less the weights' 16 GB" in fit.notes[0]
    argv = engine_for("trtllm").argv(fit.spec, Launch(host="127.0.0.1", port=8000))
    assert argv[argv.index("--kv_cache_free_gpu_memory_fraction") + 1] == "0.12"


def test_trtllm_with_weights_it_cant_read_counts_none_and_says_it_may_exceed_memory_gb() -> None:
    fit = fit_fraction(spec(engine="trtllm", memory_gb=30), [128.0], no_weights)
    assert fit.spec.gpu_memory_utilization == 0.23  # 30 / 128
    assert len(fit.warnings) == 1 and "may take up to that much more than memory_gb 30" in fit.warnings[0]


def test_trtllm_whose_memory_gb_doesnt_cover_the_weights_gets_the_least_fraction_and_a_warning() -> None:
    fit = fit_fraction(spec(engine="trtllm", memory_gb=10), [128.0], weighs(16.0))
    assert fit.spec.gpu_memory_utilization == 0.01
    assert "doesn't cover the weights' 16 GB" in fit.warnings[0]


def test_a_given_fraction_is_kept_and_a_disagreement_over_a_tenth_is_warned_with_both_numbers() -> None:
    agreeing = spec(memory_gb=70, gpu_memory_utilization=0.55)  # 70.4 GB
    assert fit_fraction(agreeing, [128.0], no_weights).spec == agreeing
    assert fit_fraction(agreeing, [128.0], no_weights).warnings == ()
    greedy = fit_fraction(spec(memory_gb=40, gpu_memory_utilization=0.9), [128.0], no_weights)
    assert greedy.spec.gpu_memory_utilization == 0.9 and not greedy.spec.memory_fraction_derived
    assert greedy.warnings == ("gpu_memory_utilization 0.9 gives vllm about 115.2 GB (0.9 of 128 GB) but memory_gb "
                               "is 40: more than the budget counts for it",)
    modest = fit_fraction(spec(memory_gb=40, gpu_memory_utilization=0.2), [128.0], no_weights)
    assert "about 25.6 GB" in modest.warnings[0] and "less than the budget holds" in modest.warnings[0]
    # trtllm, by its own rule: 16 GB of weights + 0.125 of the 112 GB left = 30 GB.
    assert fit_fraction(spec(engine="trtllm", memory_gb=30, gpu_memory_utilization=0.125), [128.0],
                        weighs(16.0)).warnings == ()
    assert fit_fraction(spec(engine="trtllm", memory_gb=30, gpu_memory_utilization=0.5), [128.0],
                        weighs(16.0)).warnings[0].startswith("gpu_memory_utilization 0.5 gives trtllm about 72 GB")


@pytest.mark.parametrize("entry", [
    {"engine": "llamacpp", "memory_gb": 8},
    {"engine": "generic", "command": ["serve"], "memory_gb": 8},
    {"engine": "vllm", "runtime": "external", "url": "http://10.0.0.7:8000/v1", "memory_gb": 8},
])
def test_engines_without_a_fraction_and_external_ones_are_untouched(entry: dict[str, Any]) -> None:
    untouched = spec(**entry)
    fit = fit_fraction(untouched, [128.0], no_weights)
    assert fit.spec == untouched and fit.spec.gpu_memory_utilization is None and fit.notes == fit.warnings == ()


def test_no_memory_gb_or_auto_derives_nothing_and_says_why() -> None:
    bare = fit_fraction(spec(), [128.0], no_weights)
    assert bare.spec.gpu_memory_utilization is None
    assert "takes its default share of 128 GB" in bare.warnings[0]
    auto = spec(memory_gb="auto").model_copy(update={"memory_gb": 30.0})  # as the loader leaves it
    fit = fit_fraction(auto, [128.0], no_weights)
    assert fit.spec.gpu_memory_utilization is None and "memory_gb auto" in fit.warnings[0]


def test_a_model_with_no_node_to_run_on_is_left_alone() -> None:
    assert fit_fraction(spec(memory_gb=40), [], no_weights).spec.gpu_memory_utilization is None


# --- the weights' size ------------------------------------------------------------------------------------------------


def sized(path: Path, gib: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.truncate(int(gib * GIB))  # sparse: no disk used
    return path


def test_weights_are_the_weight_files_directly_in_the_model_directory(tmp_path: Path) -> None:
    model = tmp_path / "llama"
    sized(model / "model-00001-of-00002.safetensors", 5)
    sized(model / "model-00002-of-00002.safetensors", 3)
    sized(model / "tokenizer.json", 0.01)
    sized(model / "original" / "consolidated.safetensors", 8)  # a copy in another layout: not counted again
    assert weights_gb(spec(engine="trtllm", model=str(model))) == pytest.approx(8.0)
    assert weights_gb(spec(engine="trtllm", model=str(sized(tmp_path / "m.gguf", 2.5)))) == pytest.approx(2.5)


def test_weights_of_a_hub_id_or_a_directory_without_weights_are_unknown(tmp_path: Path) -> None:
    assert weights_gb(spec(model="meta-llama/Llama-3.1-8B-Instruct")) is None
    (tmp_path / "empty").mkdir()
    assert weights_gb(spec(model=str(tmp_path / "empty"))) is None


def test_a_docker_model_path_is_read_through_its_volume(tmp_path: Path) -> None:
    sized(tmp_path / "hf" / "llama" / "model.safetensors", 4)
    entry = spec(engine="trtllm", runtime="docker", image="trtllm:1.3", model="/models/llama",
                 volumes=[f"{tmp_path / 'hf'}:/models:ro"])
    assert weights_gb(entry) == pytest.approx(4.0)


def test_a_relative_model_path_of_a_process_is_read_from_its_workdir(tmp_path: Path) -> None:
    sized(tmp_path / "work" / "weights" / "model.bin", 1)
    entry = spec(engine="trtllm", model="weights", workdir="work", source=tmp_path / "m.yaml")
    assert weights_gb(entry) == pytest.approx(1.0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_an_unreadable_directory_is_unknown(tmp_path: Path) -> None:
    sized(tmp_path / "locked" / "model.safetensors", 1)
    (tmp_path / "locked").chmod(0)
    try:
        assert weights_gb(spec(model=str(tmp_path / "locked"))) is None
    finally:
        (tmp_path / "locked").chmod(0o755)


# --- vLLM sleep level 1 on unified memory ---------------------------------------------------------------------------


def test_vllm_sleep_level_1_on_unified_memory_is_refused_with_the_reason_and_the_opt_in() -> None:
    level_1 = spec(idle_action="sleep", sleep_level=1, source=Path("models.d/m.yaml"))
    problem = sleep_level_problem(level_1, ["spark1"])
    assert problem is not None
    assert problem.startswith("models.d/m.yaml: sleep_level: 1 is refused for vllm on unified memory (node 'spark1')")
    assert "#50011" in problem and "sleep_level_1_on_unified_memory: true" in problem


@pytest.mark.parametrize(("fields", "unified_on"), [
    ({"idle_action": "sleep", "sleep_level": 1}, []),  # no unified node
    ({"idle_action": "sleep", "sleep_level": 1, "sleep_level_1_on_unified_memory": True}, ["spark1"]),  # opted in
    ({"idle_action": "sleep", "sleep_level": 2}, ["spark1"]),
    ({"idle_action": "stop", "sleep_level": 1}, ["spark1"]),  # never sleeps
    ({"engine": "sglang", "idle_action": "sleep", "sleep_level": 1}, ["spark1"]),  # keeps its weights on the GPU
])
def test_what_is_not_refused(fields: dict[str, Any], unified_on: list[str]) -> None:
    assert sleep_level_problem(spec(**fields), unified_on) is None


def test_the_opt_in_is_policy_it_doesnt_change_the_engine() -> None:
    plain = spec(idle_action="sleep", sleep_level=1)
    assert plain.model_copy(update={"sleep_level_1_on_unified_memory": True}).spec_hash() == plain.spec_hash()
