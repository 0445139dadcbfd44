"""Each engine adapter's own routes that the gateway forwards (`routes`, gateway/engine_routes.py): an allow-list of
harmless reads and tokenizer calls, never a route the waker drives or one that acts on every client. The lists and
the reasons are in each adapter's docstring, with the upstream file they come from."""

import pytest

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import EngineRoute
from waker.engines.registry import engine_for

EXPECTED = {
    "vllm": {"POST /tokenize", "POST /detokenize", "GET /v1/models", "GET /version", "GET /load", "GET /health",
             "GET /tokenizer_info"},
    "llamacpp": {"POST /tokenize", "POST /detokenize", "POST /apply-template", "GET /props", "GET /slots",
                 "GET /health", "GET /v1/models"},
    "sglang": {"POST /tokenize", "POST /detokenize", "GET /get_model_info", "GET /get_server_info", "GET /get_load",
               "GET /v1/models"},
    "trtllm": {"GET /version", "GET /v1/models", "GET /health"},
    "generic": set(),
    "service": set(),  # any HTTP service, reached whole under /services/<name>/ (gateway/services.py), never here
}

# Routes that put an engine to sleep or wake it, reload or swap its weights, drop caches, change settings or slots for
# everyone, act on others' requests, profile, generate outside /v1 (SGLang's /health does), or drain data that others
# collect (trtllm-serve's /metrics and /perf_metrics), plus Prometheus pages (served by /metrics/engines, under the
# metrics key). None may be forwarded, by any method.
NEVER = {
    "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache", "/server_info",
    "/pause", "/resume", "/start_profile", "/stop_profile", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/scale_elastic_ep", "/metrics", "/prometheus/metrics", "/perf_metrics", "/kv_cache_events",
    "/steady_clock_offset", "/release_memory", "/resume_memory", "/update_weights", "/health_generate",
    "/flush_cache", "/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_disk",
    "/update_weights_from_tensor", "/update_weights_from_distributed", "/init_weights_update_group",
    "/get_weights_by_name", "/abort_request", "/pause_generation", "/continue_generation", "/slow_down",
    "/set_internal_state", "/configure_logging", "/freeze_gc", "/load_lora_adapter", "/unload_lora_adapter",
    "/lora-adapters", "/generate", "/encode", "/classify", "/completion", "/completions", "/infill", "/embedding",
    "/embeddings", "/rerank", "/invocations",
}


def test_every_engine_kind_has_its_forwarded_routes_pinned_here() -> None:
    # A new adapter gets a line above: which of its own routes are harmless is a decision, not a default.
    assert set(EXPECTED) == {kind.value for kind in EngineKind}


def declared(kind: str) -> set[str]:
    return {f"{method} {path}" for path, route in engine_for(kind).routes.items() for method in route.methods}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_engine_forwards_exactly_its_documented_routes(kind: str) -> None:
    assert declared(kind) == EXPECTED[kind]


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_no_engine_forwards_a_route_that_changes_it_drains_it_or_generates_outside_v1(kind: str) -> None:
    assert set(engine_for(kind).routes) & NEVER == set()
    if kind == "sglang":  # its /health runs a generation unless an env variable (which the user may set) says not to
        assert "/health" not in engine_for(kind).routes


def sleeping(kind: str, level: int) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": kind, "model": "org/w", "command": ["x"],
                                     "idle_action": "sleep", "sleep_level": level, "reset_prefix_cache": True})


@pytest.mark.parametrize("kind", [k.value for k in EngineKind if engine_for(k).supports_sleep])
@pytest.mark.parametrize("level", [1, 2])
def test_no_route_the_waker_calls_to_sleep_wake_or_ask_about_sleep_is_forwarded(kind: str, level: int) -> None:
    engine = engine_for(kind)
    spec = sleeping(kind, level)
    calls = [*engine.sleep_calls(spec), *engine.wake_calls(spec)]
    if (state := engine.sleep_state_call(spec)) is not None:
        calls.append(state)
    assert calls  # the check below has something to check
    assert {call.path.partition("?")[0] for call in calls} & set(engine.routes) == set()


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_read_of_the_engines_state_is_a_get_and_only_tokenizer_calls_use_the_model(kind: str) -> None:
    for path, route in engine_for(kind).routes.items():
        assert route.methods <= {"GET", "POST"} and route.methods
        if not route.uses_model:
            assert route.methods == {"GET"}, path  # never a method that may change the engine
        else:
            assert path in {"/tokenize", "/detokenize", "/apply-template"}, path


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_declared_paths_are_plain_normalised_paths(kind: str) -> None:
    # The gateway calls the engine on these very strings: nothing in them may be resolved or decoded further.
    for path in engine_for(kind).routes:
        assert path.startswith("/") and not path.endswith("/"), path
        assert all(segment not in ("", ".", "..") for segment in path[1:].split("/")), path
        assert not set(path) & set("%?#\\ "), path


def test_llamacpp_settings_and_slot_actions_are_read_only() -> None:
    routes = engine_for("llamacpp").routes
    # POST /props changes the defaults for everyone; POST /slots/{id}?action=save|restore|erase touches slot caches.
    assert routes["/props"].methods == {"GET"} and routes["/slots"].methods == {"GET"}
    assert not any(path.startswith("/slots/") for path in routes)


def test_sglang_server_info_loses_the_keys_it_echoes() -> None:
    # http_server.py get_server_info: {**dataclasses.asdict(server_args), ...}, whose api_key is the engine's own key.
    assert engine_for("sglang").routes["/get_server_info"].redact == {"api_key", "admin_api_key"}
    assert all(not route.redact for path, route in engine_for("sglang").routes.items() if path != "/get_server_info")


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_an_adapters_routes_cannot_be_changed_at_run_time(kind: str) -> None:
    routes = engine_for(kind).routes
    with pytest.raises(TypeError):
        routes["/sleep"] = EngineRoute.using_model("POST")  # type: ignore[index]
    assert "/sleep" not in engine_for(kind).routes
