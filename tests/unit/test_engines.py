"""Engine adapters: exact command lines, user overrides, placeholders, readiness, registry."""

import pytest

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import Launch, Readiness
from waker.engines.flags import has_flag, option
from waker.engines.generic import GenericEngine
from waker.engines.llamacpp import LlamacppEngine
from waker.engines.registry import engine_for
from waker.engines.sglang import SglangEngine
from waker.engines.trtllm import TrtllmEngine
from waker.engines.vllm import VllmEngine

LAUNCH = Launch(host="127.0.0.1", port=8123)


# --- vLLM ---------------------------------------------------------------------------------------


def test_vllm_command_carries_port_served_name_and_memory_fraction() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="org/m", gpu_memory_utilization=0.5)
    assert VllmEngine().argv(spec, LAUNCH) == [
        "vllm", "serve", "org/m",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "m",
        "--gpu-memory-utilization", "0.5",
    ]


def test_vllm_without_memory_fraction_adds_no_memory_flag_and_appends_args_last() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="org/m", served_name="org/m-chat",
                     args=("--max-model-len", "8192"))
    assert VllmEngine().argv(spec, LAUNCH) == [
        "vllm", "serve", "org/m",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "org/m-chat",
        "--max-model-len", "8192",
    ]


def test_vllm_custom_command_replaces_vllm_serve_and_keeps_the_model_positional_once() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="/w/m", command=("/opt/venv/bin/vllm", "serve"))
    argv = VllmEngine().argv(spec, LAUNCH)
    assert argv[:3] == ["/opt/venv/bin/vllm", "serve", "/w/m"]
    assert argv.count("/w/m") == 1


def test_vllm_user_port_and_served_name_win_over_ours() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="org/m",
                     args=("--port", "9000", "--served-model-name=alias"))
    assert VllmEngine().argv(spec, LAUNCH) == [
        "vllm", "serve", "org/m",
        "--host", "127.0.0.1",
        "--port", "9000", "--served-model-name=alias",
    ]


def test_vllm_counts_underscore_spelling_as_the_users_flag() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="org/m", gpu_memory_utilization=0.5,
                     args=("--gpu_memory_utilization", "0.8"))
    argv = VllmEngine().argv(spec, LAUNCH)
    assert "--gpu-memory-utilization" not in argv
    assert argv[-2:] == ["--gpu_memory_utilization", "0.8"]


def test_vllm_user_model_flag_suppresses_the_positional_for_the_legacy_launcher() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="org/m",
                     command=("python3", "-m", "vllm.entrypoints.openai.api_server"),
                     args=("--model", "org/m"))
    assert VllmEngine().argv(spec, LAUNCH) == [
        "python3", "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "m",
        "--model", "org/m",
    ]


# --- SGLang -------------------------------------------------------------------------------------


def test_sglang_command_carries_port_served_name_and_static_memory_fraction() -> None:
    spec = ModelSpec(name="m", engine="sglang", model="org/m", gpu_memory_utilization=0.7)
    assert SglangEngine().argv(spec, LAUNCH) == [
        "python3", "-m", "sglang.launch_server", "--model-path", "org/m",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "m",
        "--mem-fraction-static", "0.7",
    ]


def test_sglang_custom_command_still_gets_model_path_once() -> None:
    spec = ModelSpec(name="m", engine="sglang", model="org/m", command=("sglang", "serve"))
    assert SglangEngine().argv(spec, LAUNCH)[:4] == ["sglang", "serve", "--model-path", "org/m"]


def test_sglang_user_memory_fraction_and_model_alias_win_over_ours() -> None:
    spec = ModelSpec(name="m", engine="sglang", model="org/m", gpu_memory_utilization=0.7,
                     args=("--model", "org/other", "--mem-fraction-static", "0.6"))
    assert SglangEngine().argv(spec, LAUNCH) == [
        "python3", "-m", "sglang.launch_server",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "m",
        "--model", "org/other", "--mem-fraction-static", "0.6",
    ]


# --- TensorRT-LLM -------------------------------------------------------------------------------


def test_trtllm_command_carries_port_served_name_and_kv_cache_fraction() -> None:
    spec = ModelSpec(name="m", engine="trtllm", model="org/m", gpu_memory_utilization=0.85)
    assert TrtllmEngine().argv(spec, LAUNCH) == [
        "trtllm-serve", "org/m",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served_model_name", "m",
        "--kv_cache_free_gpu_memory_fraction", "0.85",
    ]


def test_trtllm_custom_command_with_serve_subcommand_gets_model_positional_after_it() -> None:
    spec = ModelSpec(name="m", engine="trtllm", model="/engines/m", command=("trtllm-serve", "serve"))
    assert TrtllmEngine().argv(spec, LAUNCH)[:3] == ["trtllm-serve", "serve", "/engines/m"]


def test_trtllm_user_alias_spellings_win_over_ours() -> None:
    spec = ModelSpec(name="m", engine="trtllm", model="org/m", gpu_memory_utilization=0.85,
                     args=("--free_gpu_memory_fraction=0.5", "--served-model-name", "x", "--host", "0.0.0.0"))
    assert TrtllmEngine().argv(spec, LAUNCH) == [
        "trtllm-serve", "org/m",
        "--port", "8123",
        "--free_gpu_memory_fraction=0.5", "--served-model-name", "x", "--host", "0.0.0.0",
    ]


# --- llama.cpp ----------------------------------------------------------------------------------


def test_llamacpp_command_carries_port_and_alias_and_ignores_memory_fraction() -> None:
    spec = ModelSpec(name="m", engine="llamacpp", model="/models/m.gguf", gpu_memory_utilization=0.5)
    assert LlamacppEngine().argv(spec, LAUNCH) == [
        "llama-server", "--model", "/models/m.gguf",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--alias", "m",
    ]


def test_llamacpp_custom_command_still_gets_the_model_once() -> None:
    spec = ModelSpec(name="m", engine="llamacpp", model="/models/m.gguf",
                     command=("/opt/llama/llama-server",), args=("-ngl", "99"))
    assert LlamacppEngine().argv(spec, LAUNCH) == [
        "/opt/llama/llama-server", "--model", "/models/m.gguf",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--alias", "m",
        "-ngl", "99",
    ]


@pytest.mark.parametrize("user_model", [("-m", "/x.gguf"), ("-hf", "org/m-GGUF:Q4_K_M")])
def test_llamacpp_user_model_source_suppresses_our_model_flag(user_model: tuple[str, str]) -> None:
    spec = ModelSpec(name="m", engine="llamacpp", model="/models/m.gguf", args=user_model)
    argv = LlamacppEngine().argv(spec, LAUNCH)
    assert "--model" not in argv
    assert argv[-2:] == list(user_model)


def test_llamacpp_user_short_alias_flag_wins_over_ours() -> None:
    spec = ModelSpec(name="m", engine="llamacpp", model="/models/m.gguf", args=("-a", "chat"))
    assert LlamacppEngine().argv(spec, LAUNCH) == [
        "llama-server", "--model", "/models/m.gguf",
        "--host", "127.0.0.1",
        "--port", "8123",
        "-a", "chat",
    ]


# --- engines that need a model ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vllm", "sglang", "trtllm", "llamacpp"])
def test_engine_without_model_refuses_to_build_a_command(kind: str) -> None:
    spec = ModelSpec(name="m", engine=kind, runtime="external", url="http://h:8000/v1")
    with pytest.raises(ValueError, match="needs `model`"):
        engine_for(kind).argv(spec, LAUNCH)


# --- generic ------------------------------------------------------------------------------------


def test_generic_substitutes_every_placeholder_in_command_and_args() -> None:
    spec = ModelSpec(name="m", served_name="m-served", engine="generic", model="/w/m",
                     command=("my-server", "--listen={host}:{port}"),
                     args=("--weights", "{model}", "--name", "{served_name}", "--tag", "{name}-{port}"))
    assert GenericEngine().argv(spec, LAUNCH) == [
        "my-server", "--listen=127.0.0.1:8123",
        "--weights", "/w/m", "--name", "m-served", "--tag", "m-8123",
    ]


def test_generic_leaves_json_braces_alone() -> None:
    spec = ModelSpec(name="m", engine="generic", command=("srv",),
                     args=("--config", '{"port": {port}, "opts": {"a": 1}}', "{unknown}"))
    assert GenericEngine().argv(spec, LAUNCH) == [
        "srv", "--config", '{"port": 8123, "opts": {"a": 1}}', "{unknown}",
    ]


def test_generic_adds_no_flags_of_its_own() -> None:
    spec = ModelSpec(name="m", engine="generic", command=("srv", "--p", "{port}"), gpu_memory_utilization=0.5)
    assert GenericEngine().argv(spec, LAUNCH) == ["srv", "--p", "8123"]


def test_generic_without_command_raises_value_error() -> None:
    spec = ModelSpec(name="m", engine="generic", runtime="docker", image="img:1")
    with pytest.raises(ValueError, match="needs `command`"):
        GenericEngine().argv(spec, LAUNCH)


def test_generic_model_placeholder_without_model_raises_value_error() -> None:
    spec = ModelSpec(name="m", engine="generic", command=("srv", "{model}"))
    with pytest.raises(ValueError, match=r"uses \{model\}"):
        GenericEngine().argv(spec, LAUNCH)


# --- readiness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "model", "expected"),
    [
        ("vllm", "org/m", Readiness(path="/health")),
        ("sglang", "org/m", Readiness(path="/health")),
        ("trtllm", "org/m", Readiness(path="/health")),
        ("llamacpp", "/m.gguf", Readiness(path="/health")),
        ("generic", None, Readiness(path="/v1/models", expect_model=False)),
    ],
)
def test_readiness_uses_each_engines_health_route(kind: str, model: str | None, expected: Readiness) -> None:
    spec = ModelSpec(name="m", engine=kind, model=model, command=("srv",) if kind == "generic" else None)
    assert engine_for(kind).readiness(spec) == expected


@pytest.mark.parametrize("kind", [k.value for k in EngineKind])
def test_health_path_overrides_the_readiness_path_for_every_engine(kind: str) -> None:
    spec = ModelSpec(name="m", engine=kind, model="org/m", command=("srv",), health_path="/ready")
    readiness = engine_for(kind).readiness(spec)
    assert readiness.path == "/ready"
    assert readiness.expect_model is False


# --- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EngineKind))
def test_engine_for_returns_the_matching_adapter_for_every_kind(kind: EngineKind) -> None:
    by_enum = engine_for(kind)
    assert by_enum.kind == kind.value
    assert engine_for(kind.value) is by_enum


def test_engine_for_unknown_kind_raises_key_error_naming_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown engine 'ollama'.*vllm, sglang, trtllm, llamacpp, generic"):
        engine_for("ollama")


# --- flag helper --------------------------------------------------------------------------------


def test_has_flag_matches_separate_and_equals_forms_but_not_prefixes() -> None:
    assert has_flag(["--port", "1"], ["--port"])
    assert has_flag(["--port=1"], ["--port"])
    assert not has_flag(["--portal", "x"], ["--port"])
    assert not has_flag(["x--port"], ["--port"])


def test_option_emits_the_first_spelling_unless_any_spelling_is_given() -> None:
    assert option([], ["--a", "-a"], "v") == ["--a", "v"]
    assert option(["-a", "w"], ["--a", "-a"], "v") == []
