"""Services (engine: service) at the edges: how a models.d entry is checked, how the adapter launches and probes it,
and how a request's path and a service's redirects are read (gateway/services.py)."""

import sys

import pytest
from pydantic import ValidationError

from gateway.errors import ApiError
from gateway.services import _address, _service_url, _under_prefix
from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import Launch, Readiness
from waker.engines.registry import engine_for


def service(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": "comfyui", "engine": "service", "command": ["python", "main.py"],
                                     **fields})


def test_a_service_entry_is_launched_like_a_generic_one_and_ready_when_its_health_path_answers() -> None:
    spec = service(args=["--listen", "{host}", "--port", "{port}"], runtime="docker", image="comfyui:local",
                   container_port=8188)
    engine = engine_for(EngineKind.SERVICE)
    assert engine.argv(spec, Launch("0.0.0.0", 8188)) == ["python", "main.py", "--listen", "0.0.0.0", "--port", "8188"]
    assert engine.readiness(spec) == Readiness(path="/", expect_model=False)
    assert engine.readiness(spec.model_copy(update={"health_path": "/system_stats"})).path == "/system_stats"
    assert engine.metrics_path is None and not engine.supports_sleep


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "comfy/ui"}, "is a path segment"),
    ({"aliases": ["img:latest"]}, "is a path segment"),
    ({"served_name": "x"}, "served_name is for OpenAI engines"),
    ({"command": None}, "needs command"),
    ({"command": None, "runtime": "docker", "image": "comfyui:local"}, "needs command"),
    ({"idle_action": "sleep"}, "idle_action sleep needs engine vllm or sglang"),
])
def test_a_service_entry_that_cannot_be_reached_or_run_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        service(**fields)


def test_an_external_service_needs_only_its_url() -> None:
    spec = ModelSpec.model_validate({"name": "comfyui", "engine": "service", "runtime": "external",
                                     "url": "http://10.0.0.5:8188"})
    assert not spec.manages_lifecycle


def test_a_generic_entry_keeps_its_names_and_rules() -> None:
    # What a service refuses is refused for services only.
    spec = ModelSpec.model_validate({"name": "org/model:7b", "engine": "generic", "command": [sys.executable],
                                     "served_name": "m"})
    assert spec.upstream_name == "m"


def scope(raw: bytes) -> dict[str, object]:
    return {"raw_path": raw, "path": raw.decode("latin-1")}


@pytest.mark.parametrize(("raw", "name", "rest"), [
    (b"/services/comfyui", "comfyui", None),
    (b"/services/comfyui/", "comfyui", b"/"),
    (b"/services/comfyui/api/prompt", "comfyui", b"/api/prompt"),
    (b"/services/comfyui/api/userdata/workflows%2Fa%20b.json", "comfyui", b"/api/userdata/workflows%2Fa%20b.json"),
    (b"/services/img.v2-x_1/ws", "img.v2-x_1", b"/ws"),
    (b"/services/comfyui/a/.hidden/..x", "comfyui", b"/a/.hidden/..x"),  # dots inside names are not dot segments
])
def test_the_path_names_the_service_and_keeps_the_rest_as_sent(raw: bytes, name: str, rest: bytes | None) -> None:
    assert _address(scope(raw)) == (name, rest)


@pytest.mark.parametrize(("raw", "code"), [
    (b"/services/comfyui/../admin", "invalid_path"),
    (b"/services/comfyui/a/%2e%2E/b", "invalid_path"),
    (b"/services/comfyui/.", "invalid_path"),
    (b"/services/comfyui/a\\b", "invalid_path"),
    (b"/services/comfyui/a\x01b", "invalid_path"),
    (b"/services/comfyui/caf\xc3\xa9", "invalid_path"),
    (b"/services/", "service_not_found"),
    (b"/services/comfy%2Fui/x", "service_not_found"),
    (b"/services/.hidden/x", "service_not_found"),
])
def test_a_path_that_climbs_or_names_no_service_is_refused(raw: bytes, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        _address(scope(raw))
    assert refused.value.code == code


def test_the_service_url_is_its_root_then_the_path_and_query_as_sent() -> None:
    url = _service_url("http://127.0.0.1:8188", b"/api/view", b"filename=a%20b.png&type=output")
    assert str(url) == "http://127.0.0.1:8188/api/view?filename=a%20b.png&type=output"
    assert str(_service_url("http://h:1/base/", b"/x%2Fy", None)) == "http://h:1/base/x%2Fy"


@pytest.mark.parametrize(("location", "expected"), [
    (b"/login", b"/services/comfyui/login"),
    (b"http://127.0.0.1:8188/a?b=1", b"/services/comfyui/a?b=1"),
    (b"http://127.0.0.1:8188", b"/services/comfyui/"),
    (b"//cdn.example/x", b"//cdn.example/x"),
    (b"https://example.com/x", b"https://example.com/x"),
    (b"relative", b"relative"),
])
def test_a_redirect_to_the_services_own_paths_stays_under_its_prefix(location: bytes, expected: bytes) -> None:
    assert _under_prefix(location, "http://127.0.0.1:8188", "comfyui") == expected
