"""An engine's own useful routes through the gateway, `/engines/{model}/{route}` (issue 19): the routes its adapter
declares answer with the engine's own body, every other route (sleep, wake, RPC, cache flushes, settings) is refused
without reaching the engine, traversal can't leave the allow-list, and a key reaches only the models it may use.

The engines are the flavoured fakes (tests/fake_engine.py --flavor ...) driven through the real adapters: each lists
the calls it got beyond /v1 at /route_log, and its sleep, wake and cache calls at /sleep_log."""

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fake_engine import fake_tokens
from tests.harness import FAKE_ENGINE, Gateway, fake_engine_spec, run_gateway, write_models

KEY, OTHER_KEY = "sk-engine-routes-one", "sk-engine-routes-two"
KEYS = [{"key": KEY, "name": "one", "models": ["vllm-m", "llama-m"]},
        {"key": OTHER_KEY, "name": "two", "models": ["llama-m", "vl"]}]


def flavoured(name: str, engine: str, model: str, **fields: Any) -> dict[str, Any]:
    """The fake engine behaving as `engine`, launched through that engine's adapter (its flags, its routes)."""
    return {"name": name, "engine": engine, "model": model,
            "command": [sys.executable, FAKE_ENGINE, "--flavor", engine],
            "start_timeout": "20s", "stop_timeout": "5s", "min_uptime": 0, **fields}


# Sleep mode on, idle timeout far away: the sleep and dev routes exist, and only a forwarded call could use them.
VLLM = flavoured("vllm-m", "vllm", "org/weights", aliases=["vl"], idle_action="sleep", idle_timeout="1h")
SGLANG = flavoured("sglang-m", "sglang", "/models/weights", aliases=["sg"], idle_action="sleep", idle_timeout="1h",
                   env={"FAKE_SGLANG_API_KEY": "sk-engine-secret"})
LLAMA = flavoured("llama-m", "llamacpp", "/models/tiny.gguf", aliases=["ll"])


async def engine_log(gw: Gateway, name: str, log: str) -> Any:
    handle = gw.waker.controller(name).handle
    assert handle is not None
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"{handle.root_url}/{log}")).json()


def error_code(reply: httpx.Response) -> str:
    return reply.json()["error"]["code"]


async def raw(gw: Gateway, method: bytes, target: bytes, body: bytes = b"{}") -> tuple[int, bytes]:
    """One request exactly as given (no client library normalises the target); the status and the body."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(method + b" " + target + b" HTTP/1.1\r\n" + f"Host: 127.0.0.1:{port}\r\n".encode()
                     + b"Content-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


async def test_vllm_tokenize_and_reads_answer_and_its_dev_routes_are_never_reached(tmp_path: Path) -> None:
    async with run_gateway(write_models(tmp_path, VLLM)) as gw, httpx.AsyncClient(timeout=30) as client:
        # A read of a stopped model starts nothing.
        cold = await client.get(gw.url + "/engines/vllm-m/version")
        assert (cold.status_code, error_code(cold), gw.starts("vllm-m")) == (503, "model_not_running", 0)

        # Tokenize asks the model something: it starts it, like a request. The body names the alias, which vLLM
        # would refuse (404): the gateway gives the engine its own name.
        tokenized = await client.post(gw.url + "/engines/vl/tokenize", json={"model": "vl", "prompt": "hello world"})
        assert tokenized.status_code == 200, tokenized.text
        assert tokenized.json() == {"count": 2, "max_model_len": 4096, "tokens": fake_tokens("hello world"),
                                    "token_strs": None}
        assert gw.starts("vllm-m") == 1
        assert (await client.post(gw.url + "/engines/vllm-m/detokenize", json={"tokens": [7, 8]})).json() \
            == {"prompt": "t7 t8"}
        version = await client.get(gw.url + "/engines/vllm-m/version")
        assert (version.status_code, version.json()) == (200, {"version": "0.0.0+fake"})
        load = await client.get(gw.url + "/engines/vllm-m/load?verbose=1")
        assert (load.status_code, load.json()) == (200, {"server_load": 0})

        refused = {path: await client.request(method, gw.url + path) for method, path in [
            ("POST", "/engines/vllm-m/sleep?level=1"), ("POST", "/engines/vllm-m/wake_up"),
            ("POST", "/engines/vllm-m/collective_rpc"), ("POST", "/engines/vllm-m/reset_prefix_cache"),
            ("GET", "/engines/vllm-m/is_sleeping"), ("GET", "/engines/vllm-m/metrics"), ("GET", "/engines/vl/Sleep")]}
        assert {path: (r.status_code, error_code(r)) for path, r in refused.items()} \
            == dict.fromkeys(refused, (404, "engine_route_not_found"))
        # The refusal names what is forwarded.
        assert "POST /tokenize" in refused["/engines/vllm-m/wake_up"].json()["error"]["message"]
        wrong_method = await client.post(gw.url + "/engines/vllm-m/version")
        assert (wrong_method.status_code, error_code(wrong_method), wrong_method.headers["allow"]) \
            == (405, "method_not_allowed", "GET")
        mismatch = await client.post(gw.url + "/engines/vllm-m/tokenize", json={"model": "other", "prompt": "x"})
        assert (mismatch.status_code, error_code(mismatch)) == (400, "model_mismatch")

        assert await engine_log(gw, "vllm-m", "sleep_log") == []
        assert await engine_log(gw, "vllm-m", "route_log") == [
            "POST /tokenize", "POST /detokenize", "GET /version", "GET /load?verbose=1"]
        assert gw.waker.controller("vllm-m").state == "ready"


async def test_llamacpp_props_slots_and_tokenize_answer_and_its_settings_and_slot_actions_are_refused(
        tmp_path: Path) -> None:
    async with run_gateway(write_models(tmp_path, LLAMA)) as gw, httpx.AsyncClient(timeout=30) as client:
        tokenized = await client.post(gw.url + "/engines/ll/tokenize", json={"content": "one two three"})
        assert (tokenized.status_code, tokenized.json()) == (200, {"tokens": fake_tokens("one two three")})
        props = await client.get(gw.url + "/engines/llama-m/props")
        assert props.status_code == 200 and props.json()["total_slots"] == 1
        slots = await client.get(gw.url + "/engines/ll/slots?fail_on_no_slot=1")
        assert slots.status_code == 200 and slots.json()[0]["id"] == 0
        template = await client.post(gw.url + "/engines/llama-m/apply-template",
                                     json={"messages": [{"role": "user", "content": "hi"}]})
        assert template.json() == {"prompt": "<|user|>hi"}

        set_props = await client.post(gw.url + "/engines/llama-m/props", json={"n_ctx": 1})
        erase = await client.post(gw.url + "/engines/llama-m/slots/0?action=erase", json={})
        save = await client.post(gw.url + "/engines/llama-m/slots/0?action=save", json={"filename": "x.bin"})
        assert (set_props.status_code, error_code(set_props)) == (405, "method_not_allowed")
        assert [(r.status_code, error_code(r)) for r in (erase, save)] == [(404, "engine_route_not_found")] * 2
        assert await engine_log(gw, "llama-m", "route_log") == [
            "POST /tokenize", "GET /props", "GET /slots?fail_on_no_slot=1", "POST /apply-template"]


async def test_sglang_server_info_loses_the_engines_key_and_its_memory_and_cache_routes_are_refused(
        tmp_path: Path) -> None:
    async with run_gateway(write_models(tmp_path, SGLANG)) as gw, httpx.AsyncClient(timeout=30) as client:
        tokenized = await client.post(gw.url + "/engines/sg/tokenize", json={"prompt": "a b"})
        assert tokenized.status_code == 200 and tokenized.json()["tokens"] == fake_tokens("a b")
        info = await client.get(gw.url + "/engines/sglang-m/get_server_info")
        assert info.status_code == 200
        assert info.json()["served_model_name"] == "sglang-m" and info.json()["max_total_num_tokens"] == 4096
        assert "api_key" not in info.json() and "admin_api_key" not in info.json()
        assert "sk-engine-secret" not in info.text and int(info.headers["content-length"]) == len(info.content)
        model_info = await client.get(gw.url + "/engines/sg/get_model_info")
        assert model_info.json()["model_path"] == "/models/weights"

        refused = [await client.request(method, gw.url + "/engines/sglang-m" + path) for method, path in [
            ("POST", "/flush_cache"), ("GET", "/flush_cache"), ("POST", "/release_memory_occupation"),
            ("POST", "/resume_memory_occupation"), ("POST", "/update_weights_from_disk"), ("GET", "/health_generate"),
            ("GET", "/health")]]
        assert [(r.status_code, error_code(r)) for r in refused] == [(404, "engine_route_not_found")] * len(refused)
        assert await engine_log(gw, "sglang-m", "sleep_log") == []
        assert await engine_log(gw, "sglang-m", "route_log") == [
            "POST /tokenize", "GET /get_server_info", "GET /get_model_info"]
        assert (await engine_log(gw, "sglang-m", "stats"))["released"] == []  # its memory was never released


# Each would leave the allow-list once dot segments are resolved or escapes decoded, or is not a normalised path.
TRAVERSALS = [
    b"/engines/vllm-m/../sleep", b"/engines/vllm-m/%2e%2e/sleep", b"/engines/vllm-m/%2E%2E/wake_up",
    b"/engines/vllm-m/.%2e/sleep", b"/engines/vllm-m/tokenize/../sleep", b"/engines/vllm-m/tokenize/%2e%2e/sleep",
    b"/engines/vllm-m/tokenize%2f..%2fsleep", b"/engines/vllm-m/tokenize%2F..%2Fsleep", b"/engines/vllm-m/%2fsleep",
    b"/engines/vllm-m/..%5csleep", b"/engines/vllm-m//sleep", b"/engines//vllm-m/sleep", b"/engines/vllm-m/./sleep",
    b"/engines/vllm-m/sleep%00", b"/engines/vllm-m/", b"/engines/vllm-m", b"/engines/vllm-m/v1/../../sleep",
]


async def test_paths_that_would_leave_the_allow_list_are_refused_before_reaching_or_starting_anything(
        tmp_path: Path) -> None:
    cold = flavoured("cold", "vllm", "org/cold", idle_action="sleep", idle_timeout="1h")
    async with run_gateway(write_models(tmp_path, VLLM, cold)) as gw, httpx.AsyncClient(timeout=30) as client:
        assert (await client.post(gw.url + "/engines/vllm-m/tokenize", json={"prompt": "x"})).status_code == 200
        answers = {path: await raw(gw, b"POST", path) for path in TRAVERSALS}
        refused = {path: status for path, (status, _) in answers.items()}
        assert refused == dict.fromkeys(TRAVERSALS, 400)
        assert all(b'"code": "invalid_path"' in body for _, body in answers.values())
        # An escaped letter is no way around the allow-list: the route is compared as sent, never decoded.
        for path in (b"/engines/vllm-m/sl%65ep", b"/engines/vllm-m/%73leep", b"/engines/vllm-m/tok%65nize"):
            assert (await raw(gw, b"POST", path))[0] == 404
        # Refused before a model is looked at: a cold one is never started.
        for path in (b"/engines/cold/%2e%2e/tokenize", b"/engines/cold/tokenize/../sleep", b"/engines/cold//tokenize"):
            assert (await raw(gw, b"POST", path))[0] == 400
        assert gw.starts("cold") == 0

        assert await engine_log(gw, "vllm-m", "sleep_log") == []
        assert await engine_log(gw, "vllm-m", "route_log") == ["POST /tokenize"]
        assert gw.waker.controller("vllm-m").state == "ready"


async def test_a_key_reaches_the_engine_routes_of_the_models_it_may_use_by_name_or_alias(tmp_path: Path) -> None:
    generic = fake_engine_spec("plain")
    models = write_models(tmp_path, VLLM, LLAMA, generic)
    async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
        one, two = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
        body = {"prompt": "hi"}
        assert (await client.post(gw.url + "/engines/vllm-m/tokenize", json=body)).status_code == 401
        wrong = await client.post(gw.url + "/engines/vllm-m/tokenize", json=body,
                                  headers={"Authorization": "Bearer sk-not-a-key"})
        assert wrong.status_code == 401
        # Key two names the alias "vl", which never grants the model behind it (vllm-m): refused, by name and alias.
        for target in ("/engines/vllm-m/tokenize", "/engines/vl/tokenize"):
            refused = await client.post(gw.url + target, json=body, headers=two)
            assert (refused.status_code, error_code(refused)) == (403, "model_not_allowed")
        assert gw.starts("vllm-m") == 0

        by_alias = await client.post(gw.url + "/engines/vl/tokenize", json=body, headers=one)
        assert by_alias.status_code == 200 and by_alias.json()["tokens"] == fake_tokens("hi")
        props = await client.get(gw.url + "/engines/ll/props", headers=two)
        assert (props.status_code, error_code(props)) == (503, "model_not_running")  # allowed, but not running
        # Another model's routes stay closed to a key, and a name that is no model is a 404.
        plain = await client.get(gw.url + "/engines/plain/version", headers=one)
        assert (plain.status_code, error_code(plain)) == (403, "model_not_allowed")
        missing = await client.get(gw.url + "/engines/nothing-here/version", headers=one)
        assert (missing.status_code, error_code(missing)) == (404, "model_not_found")
        # The client's key never reaches the engine: the fake's route log shows the call, the gateway's key nowhere.
        assert await engine_log(gw, "vllm-m", "route_log") == ["POST /tokenize"]


async def test_a_generic_engine_forwards_none_of_its_routes(tmp_path: Path) -> None:
    async with run_gateway(write_models(tmp_path, fake_engine_spec("plain"))) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(gw.url + "/engines/plain/stats")
        assert (reply.status_code, error_code(reply)) == (404, "engine_route_not_found")
        assert "forwards none" in reply.json()["error"]["message"] and gw.starts("plain") == 0


async def test_a_model_whose_name_holds_a_slash_is_told_from_the_route_after_it(tmp_path: Path) -> None:
    # Model names may hold '/': the longest leading run of segments that names a model and leaves a forwarded route.
    models = write_models(tmp_path, flavoured("org", "llamacpp", "/models/tiny.gguf"))
    (models / "org-chat.yaml").write_text(yaml.safe_dump(flavoured("org/chat", "vllm", "org/weights")))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        nested = await client.get(gw.url + "/engines/org/chat/version")
        assert (nested.status_code, error_code(nested)) == (503, "model_not_running")
        assert "'org/chat'" in nested.json()["error"]["message"]
        outer = await client.get(gw.url + "/engines/org/props")
        assert (outer.status_code, error_code(outer)) == (503, "model_not_running")
        assert "'org'" in outer.json()["error"]["message"]
        neither = await client.get(gw.url + "/engines/org/chat/props")  # org/chat is a vLLM: no /props
        assert (neither.status_code, error_code(neither)) == (404, "engine_route_not_found")
        assert gw.starts("org/chat") == gw.starts("org") == 0


async def test_a_client_that_leaves_during_the_start_a_tokenize_began_leaves_no_lease_and_no_call(
        tmp_path: Path) -> None:
    slow = flavoured("slow", "llamacpp", "/models/tiny.gguf", args=["--ready-after", "1.5"])
    async with run_gateway(write_models(tmp_path, slow)) as gw, httpx.AsyncClient(timeout=30) as client:
        asking = asyncio.create_task(client.post(gw.url + "/engines/slow/tokenize", json={"content": "x"}))
        controller = gw.waker.controller("slow")
        await until(lambda: controller.state == "starting" and controller.waiting == 1)  # parked in the start
        asking.cancel()  # the client leaves: its connection closes
        await until(lambda: controller.waiting == 0)
        assert controller.state == "starting"  # it left before the engine was up; the start goes on
        await gw.waker.events.wait_for(lambda e: e.kind == "transition" and e.target == "ready", 10)
        assert (controller.waiting, controller.in_flight) == (0, 0)
        assert await engine_log(gw, "slow", "route_log") == []  # the call it would have made was never made


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a condition no event announces (a request parked in a start, or gone from it)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_background_task_key_never_starts_a_model_through_its_engine_routes(tmp_path: Path) -> None:
    """A key marked `tasks: true` never starts, wakes or waits for a model (gateway/tasks.py): its tokenize on a stopped
    model is refused with nothing started; once the model is up (by another key), it is served."""
    keys = [{"key": KEY, "name": "one", "models": ["llama-m"]},
            {"key": OTHER_KEY, "name": "tasks", "models": ["llama-m"], "tasks": True}]
    models = write_models(tmp_path, LLAMA)
    async with run_gateway(models, api_keys=keys) as gw, httpx.AsyncClient(timeout=30) as client:
        one, tasks = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
        body = {"content": "hi"}
        refused = await client.post(gw.url + "/engines/llama-m/tokenize", json=body, headers=tasks)
        assert (refused.status_code, error_code(refused)) == (503, "model_not_running")
        assert refused.headers["x-should-retry"] == "false"
        assert gw.starts("llama-m") == 0
        assert (await client.post(gw.url + "/engines/llama-m/tokenize", json=body, headers=one)).status_code == 200
        served = await client.post(gw.url + "/engines/llama-m/tokenize", json=body, headers=tasks)
        assert served.status_code == 200 and gw.starts("llama-m") == 1
