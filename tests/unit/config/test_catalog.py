"""The example catalog (models.d/examples): it loads, fits the default budget, routes every role
alias, and every entry builds a sane engine command line."""

import os
from pathlib import Path

import pytest

from gateway.cli import main
from waker.config.registry import Registry, load_dir
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.base import Launch
from waker.engines.registry import engine_for
from waker.scheduling.budget import Budget
from waker.scheduling.placement import budget_problems

EXAMPLES = Path(__file__).resolve().parents[3] / "models.d" / "examples"
ROLES = ("brain", "chat", "coder", "autocomplete", "utility", "embed")
LAUNCH = Launch("0.0.0.0", 8000)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_dir(EXAMPLES)


def _flags(argv: list[str]) -> list[str]:
    """Every option in argv (`--flag value` or `--flag=value`), as written; values are skipped."""
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("-") and not _is_number(arg)]


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def test_catalog_loads_and_fits_the_default_budget(registry: Registry) -> None:
    assert len(registry) >= 7
    assert budget_problems(registry.values(), {"local": Budget(121.7)}) == []
    for spec in registry.values():
        assert 0 < spec.memory_gb <= Budget(121.7).capacity_gb, spec.name


@pytest.mark.parametrize("role", ROLES)
def test_each_role_alias_resolves(registry: Registry, role: str) -> None:
    spec = registry.resolve(role)
    assert role in spec.aliases


def test_every_entry_runs_in_docker_with_what_gb10_needs(registry: Registry) -> None:
    for spec in registry.values():
        assert spec.runtime is RuntimeKind.DOCKER, spec.name
        assert spec.image, spec.name
        assert spec.gpus == "all", spec.name
        assert spec.start_timeout >= 180, spec.name


def test_the_120b_has_a_long_start_timeout_and_the_20b_sleeps_at_level_2(registry: Registry) -> None:
    brain = registry.resolve("brain")
    assert brain.start_timeout >= 15 * 60
    chat = registry.resolve("chat")
    assert chat.idle_action == "sleep"
    assert chat.sleep_level == 2
    assert chat.sleep_memory_gb is not None and chat.sleep_memory_gb < chat.memory_gb


CUDA_TOTAL_GB = 119.6  # what CUDA reports on a GB10 (the OS sees 121.7 GiB); vLLM's fraction is of this
IMAGES = {  # the tags NVIDIA's DGX Spark playbooks run (docs/quickstart-dgx-spark.md §3)
    "vllm": "nvcr.io/nvidia/vllm:26.02-py3",
    "sglang": "lmsysorg/sglang:latest-cu130",
    "trtllm": "nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc13",
    "llamacpp": "ghcr.io/ggml-org/llama.cpp:server-cuda13",
}


def test_vllm_fractions_are_of_the_cuda_total_and_memory_gb_covers_them(registry: Registry) -> None:
    for spec in registry.values():
        if spec.engine == "vllm":
            assert spec.gpu_memory_utilization is not None, spec.name
            takes = spec.gpu_memory_utilization * CUDA_TOTAL_GB
            assert takes <= spec.memory_gb <= takes + 4, spec.name


def test_the_sglang_entry_caps_its_pool_since_its_fraction_is_of_the_memory_free_at_launch(registry: Registry) -> None:
    utility = registry.resolve("utility")
    assert "--max-total-tokens" in utility.args
    assert utility.gpu_memory_utilization is not None and utility.gpu_memory_utilization >= 0.5


def test_one_tag_per_engine_and_the_ones_the_playbooks_run(registry: Registry) -> None:
    for spec in registry.values():
        if spec.engine == "service":  # a service's image is its own (comfyui.yaml says how it is built)
            continue
        assert spec.image == IMAGES[spec.engine], spec.name


def test_host_paths_are_absolute_and_shm_size_is_not_set_beside_host_ipc(registry: Registry) -> None:
    # `~` would be expanded by the gateway: /root under compose and the systemd unit, whose cache is empty.
    for spec in registry.values():
        for volume in spec.volumes:
            assert volume.startswith("/home/YOU/"), (spec.name, volume)
        if spec.ipc == "host":
            assert spec.shm_size is None, spec.name


def test_gpt_oss_gets_its_tokenizer_files_and_first_starts_have_the_time_and_caches_they_need(
        registry: Registry) -> None:
    for role, timeout in (("brain", 30 * 60), ("chat", 15 * 60)):
        spec = registry.resolve(role)
        assert spec.env.get("TIKTOKEN_ENCODINGS_BASE") == "/tiktoken", role
        assert any(v.split(":")[1] == "/tiktoken" for v in spec.volumes), role
        assert spec.start_timeout >= timeout, role
        inside = {v.split(":")[1] for v in spec.volumes}
        assert {"/root/.cache/vllm", "/root/.cache/flashinfer"} <= inside, role


@pytest.mark.parametrize("name", sorted(os.path.splitext(p.name)[0] for p in EXAMPLES.glob("*.yaml")))
def test_argv_names_the_model_once_and_repeats_no_flag(registry: Registry, name: str) -> None:
    spec = next(s for s in registry.values() if s.source is not None and s.source.stem == name)
    argv = engine_for(spec.engine).argv(spec, LAUNCH)
    if spec.engine != "service":  # a service serves no model name (it is reached by its path) and may load several
        assert spec.upstream_name in argv
        assert argv.count(spec.model) == 1
    flags = _flags(argv)
    assert len(flags) == len(set(flags)), f"{spec.name}: repeated flag in {argv}"
    assert "0.0.0.0" in argv and "8000" in argv


def test_aliases_are_unique_across_files(registry: Registry) -> None:
    names = [n for spec in registry.values() for n in spec.names]
    assert len(names) == len(set(names))
    assert all(isinstance(spec, ModelSpec) for spec in registry.values())


def test_sparkgate_check_accepts_the_catalog(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPARKGATE_"):
            monkeypatch.delenv(key)
    # The catalog is for a DGX Spark: on a smaller machine (the node's total is read from it) the big models can't fit.
    monkeypatch.setenv("SPARKGATE_NODES", '{"local": {"total_gb": 121.7, "unified_memory": true}}')
    assert main(["check", "--config-dir", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "model(s) OK" in out
    for role in ROLES:
        assert role in out
