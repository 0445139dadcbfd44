"""Engine adapters: exact command lines, user overrides, placeholders, readiness, the spec as launched and
its hash, sleep and wake calls, metrics routes, registry."""

import pytest

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import Call, Launch, Readiness
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
        "--shutdown-timeout", "15",  # 3/4 of the default stop_timeout of 20 s: it drains, then exits before the kill
    ]


def test_vllm_without_memory_fraction_adds_no_memory_flag_and_appends_args_last() -> None:
    spec = ModelSpec(name="m", engine="vllm", model="org/m", served_name="org/m-chat",
                     args=("--max-model-len", "8192"))
    assert VllmEngine().argv(spec, LAUNCH) == [
        "vllm", "serve", "org/m",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "org/m-chat",
        "--shutdown-timeout", "15",
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
        "--shutdown-timeout", "15",
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
        "--shutdown-timeout", "15",
        "--model", "org/m",
    ]


@pytest.mark.parametrize(("fields", "flag"), [
    ({"stop_timeout": 60}, ["--shutdown-timeout", "45"]),
    ({"stop_timeout": 1}, ["--shutdown-timeout", "0"]),
    ({"args": ("--shutdown-timeout", "5")}, []),  # the user's own value wins (and is not repeated)
    ({"shutdown_drain": False}, []),  # vLLM before 0.18 rejects the flag
])
def test_vllm_drains_on_stop_within_its_stop_timeout(fields: dict, flag: list[str]) -> None:
    # vLLM >= 0.18 aborts the requests in flight on SIGTERM unless --shutdown-timeout says how long to drain.
    argv = VllmEngine().argv(ModelSpec(name="m", engine="vllm", model="org/m", **fields), LAUNCH)
    ours = argv[argv.index("m") + 1:len(argv) - len(fields.get("args", ()))]
    assert ours == flag


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


# --- the spec as launched, and its hash ------------------------------------------------------

# The hashes running engines carry as labels: computed with waker.sleep.launch_spec before it moved into the
# adapters. A change here means every adopted container of that kind would be recreated after an upgrade.
LAUNCH_HASHES = [
    ({"engine": "vllm", "model": "org/m", "idle_action": "sleep"}, "40590053e25e9aca"),
    ({"engine": "vllm", "model": "org/m", "idle_action": "sleep", "sleep_level": 1,
      "args": ("--enable-sleep-mode",), "env": {"VLLM_SERVER_DEV_MODE": "0", "A": "b"}}, "ea2660d66fb73c9f"),
    ({"engine": "vllm", "model": "org/m"}, "5a14cc9f46d2ef94"),
    # SGLang engines are launched with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 since issue 14 (cheap probes): their
    # hashes changed once, so containers of an earlier release are recreated, not adopted.
    ({"engine": "sglang", "model": "org/m", "idle_action": "sleep", "args": ("--tp-size", "2")}, "12af7b5c4a121f98"),
    ({"engine": "sglang", "model": "org/m"}, "305df8f0f80c8bef"),
    ({"engine": "trtllm", "model": "org/m"}, "930c3dcd0d9ad901"),
    ({"engine": "llamacpp", "model": "/m.gguf", "args": ("-ngl", "99")}, "a43904d354d6aaf4"),
    ({"engine": "generic", "command": ("srv", "{port}")}, "923c46b6817e5eb0"),
]


@pytest.mark.parametrize(("fields", "expected"), LAUNCH_HASHES)
def test_launch_hash_is_unchanged_from_before_the_adapters_owned_it(fields: dict, expected: str) -> None:
    spec = ModelSpec(name="m", **fields)
    engine = engine_for(spec.engine)
    assert engine.launch_hash(spec) == expected
    assert engine.launch_spec(spec).spec_hash() == expected


@pytest.mark.parametrize(
    ("fields", "args", "env"),
    [
        # vLLM's sleep routes exist only in dev mode and with the sleep flag.
        ({"engine": "vllm", "idle_action": "sleep"}, ("--enable-sleep-mode",), {"VLLM_SERVER_DEV_MODE": "1"}),
        # The user's own flag is not repeated, and their env wins over ours.
        ({"engine": "vllm", "idle_action": "sleep", "args": ("--enable-sleep-mode", "-tp", "1"),
          "env": {"VLLM_SERVER_DEV_MODE": "0"}}, ("--enable-sleep-mode", "-tp", "1"), {"VLLM_SERVER_DEV_MODE": "0"}),
        ({"engine": "vllm", "args": ("-tp", "1")}, ("-tp", "1"), {}),
        # SGLang: the memory saver for sleep, and readiness probes that don't run a generation each (its /health
        # does since PR #8444 unless told not to); the user's env wins.
        ({"engine": "sglang", "idle_action": "sleep", "args": ("--tp-size", "2")},
         ("--tp-size", "2", "--enable-memory-saver"), {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}),
        ({"engine": "sglang", "idle_action": "sleep", "args": ("--enable-memory-saver",)},
         ("--enable-memory-saver",), {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}),
        ({"engine": "sglang"}, (), {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}),
        ({"engine": "sglang", "env": {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "1"}}, (),
         {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "1"}),
        ({"engine": "trtllm", "args": ("--tp_size", "1")}, ("--tp_size", "1"), {}),
        ({"engine": "llamacpp", "env": {"A": "b"}}, (), {"A": "b"}),
        ({"engine": "generic", "command": ("srv",)}, (), {}),
    ],
)
def test_launch_spec_adds_exactly_the_flags_and_env_the_sleep_mode_needs(
        fields: dict, args: tuple[str, ...], env: dict[str, str]) -> None:
    spec = ModelSpec(name="m", model="org/m", **fields)
    launched = engine_for(spec.engine).launch_spec(spec)
    assert launched.args == args
    assert dict(launched.env) == env
    assert launched.model_copy(update={"args": spec.args, "env": spec.env}) == spec  # nothing else changes


# --- sleep and wake -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "supports_sleep"),
    [("vllm", True), ("sglang", True), ("trtllm", False), ("llamacpp", False), ("generic", False)],
)
def test_only_vllm_and_sglang_support_sleep(kind: str, supports_sleep: bool) -> None:
    assert engine_for(kind).supports_sleep is supports_sleep


@pytest.mark.parametrize(
    ("fields", "sleep", "wake"),
    [
        # mode=wait: a request that slipped in finishes first (the default, abort, fails it).
        ({"engine": "vllm", "sleep_level": 1},
         (Call("POST", "/sleep?level=1&mode=wait"),),
         (Call("POST", "/wake_up"),)),
        # Level 2 dropped the weights: they are reloaded in place between waking the two memory pools.
        ({"engine": "vllm", "sleep_level": 2},
         (Call("POST", "/sleep?level=2&mode=wait"),),
         (Call("POST", "/wake_up?tags=weights"),
          Call("POST", "/collective_rpc", {"method": "reload_weights"}),
          Call("POST", "/wake_up?tags=kv_cache"))),
        ({"engine": "vllm", "sleep_level": 2, "reset_prefix_cache": True},
         (Call("POST", "/sleep?level=2&mode=wait"),),
         (Call("POST", "/wake_up?tags=weights"),
          Call("POST", "/collective_rpc", {"method": "reload_weights"}),
          Call("POST", "/wake_up?tags=kv_cache"),
          Call("POST", "/reset_prefix_cache"))),
        # SGLang level 1 keeps the weights in GPU memory; level 2 releases them too, and without a CPU backup their
        # contents are gone: the wake reloads them from disk. A release and its resume name the same tags.
        ({"engine": "sglang", "sleep_level": 1},
         (Call("POST", "/flush_cache", retry=True),
          Call("POST", "/release_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})),
         (Call("POST", "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}),)),
        ({"engine": "sglang", "sleep_level": 2},
         (Call("POST", "/flush_cache", retry=True),
          Call("POST", "/release_memory_occupation", {"tags": ["weights", "kv_cache", "cuda_graph"]})),
         (Call("POST", "/resume_memory_occupation", {"tags": ["weights", "kv_cache", "cuda_graph"]}),
          Call("POST", "/update_weights_from_disk", {"model_path": "org/m"}))),
    ],
)
def test_sleep_and_wake_calls_follow_each_engines_api(
        fields: dict, sleep: tuple[Call, ...], wake: tuple[Call, ...]) -> None:
    spec = ModelSpec(name="m", model="org/m", idle_action="sleep", **fields)
    engine = engine_for(spec.engine)
    assert engine.sleep_calls(spec) == sleep
    assert engine.wake_calls(spec) == wake


@pytest.mark.parametrize("kind", ["trtllm", "llamacpp", "generic"])
def test_engines_without_sleep_mode_refuse_sleep_and_wake_naming_the_engine(kind: str) -> None:
    spec = ModelSpec(name="m", engine=kind, model="org/m", command=("srv",))
    engine = engine_for(kind)
    with pytest.raises(ValueError, match=f"engine {kind} has no sleep mode"):
        engine.sleep_calls(spec)
    with pytest.raises(ValueError, match=f"engine {kind} has no sleep mode"):
        engine.wake_calls(spec)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("vllm", Call("GET", "/is_sleeping")),  # answers {"is_sleeping": bool}
        ("sglang", None),  # no route tells
        ("trtllm", None),
        ("llamacpp", None),
        ("generic", None),
    ],
)
def test_sleep_state_call_is_vllms_is_sleeping_and_none_elsewhere(kind: str, expected: Call | None) -> None:
    spec = ModelSpec(name="m", engine=kind, model="org/m", command=("srv",))
    assert engine_for(kind).sleep_state_call(spec) == expected


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("vllm", "/metrics"),
        ("sglang", "/metrics"),
        # trtllm-serve's /metrics is JSON iteration stats; its Prometheus text is mounted here.
        ("trtllm", "/prometheus/metrics"),
        ("llamacpp", "/metrics"),
        ("generic", "/metrics"),
    ],
)
def test_metrics_path_is_each_engines_prometheus_route(kind: str, path: str) -> None:
    assert engine_for(kind).metrics_path == path


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
