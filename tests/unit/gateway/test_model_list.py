"""/v1/models as clients use it, and llama.cpp's router API (POST /models/load, /models/unload), through the real
app in process over fake engines: each entry's llama.cpp `status` in every state, what Open WebUI's llama.cpp
provider makes of it, display names, descriptions and context windows, hiding aliases, load and unload driving the
real state (never under a request, never a pinned model), scoped by key. Each test here failed before issue 18."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fakes import FakeEngineApi, FakeHandle, FakeRuntime
from waker.clock import FakeClock
from waker.config.nodes import NodeConfig
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import StartFailed
from waker.runtime.external import ExternalRuntime
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.state import ModelState
from waker.waker import Waker

S = ModelState
ONLY_A = "sk-only-a-0001"
ADMIN = "admin-key-0001"


def spec(name: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "command": ["x"], "memory_gb": 10, "min_uptime": 0, **fields})


def sleeper(name: str) -> ModelSpec:
    return spec(name, engine="vllm", model="org/weights", command=None, idle_action="sleep")


def external(name: str) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "runtime": "external", "engine": "vllm",
                                     "url": "http://127.0.0.1:9/v1"})


@dataclass
class Gw:
    client: httpx.AsyncClient
    waker: Waker
    runtime: FakeRuntime
    api: FakeEngineApi

    async def listing(self, path: str = "/v1/models", key: str | None = None) -> dict[str, dict[str, Any]]:
        resp = await self.client.get(path, headers=_auth(key))
        assert resp.status_code == 200, resp.text
        return {m["id"]: m for m in resp.json()["data"]}

    async def load(self, model: str, key: str | None = None) -> httpx.Response:
        return await self.client.post("/models/load", json={"model": model}, headers=_auth(key))

    async def unload(self, model: str, key: str | None = None) -> httpx.Response:
        return await self.client.post("/models/unload", json={"model": model}, headers=_auth(key))

    async def reaches(self, model: str, state: str) -> None:
        controller = self.waker.controller(model)
        async with asyncio.timeout(5):
            while controller.state != state:
                await controller.changed().wait()

    async def engine(self, number: int = 1) -> FakeHandle:
        """The `number`th engine the runtime launched, once it is (a start launches in its own task)."""
        async with asyncio.timeout(5):
            while len(self.runtime.handles) < number:
                self.runtime.started.clear()  # no await since the check: no launch slips in between
                await self.runtime.started.wait()
        return self.runtime.handles[number - 1]


def _auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


@asynccontextmanager
async def gateway(tmp_path: Path, *specs: ModelSpec, auto_ready: bool = True, **settings: Any) -> AsyncIterator[Gw]:
    """The real app (create_app) over a waker of fake engines, called in process."""
    runtime = FakeRuntime(auto_ready=auto_ready)
    api = FakeEngineApi(runtime)
    runtimes = {RuntimeKind.PROCESS: runtime, RuntimeKind.EXTERNAL: ExternalRuntime()}
    waker = Waker(Registry(list(specs)), runtimes=runtimes, budgets={"local": Budget(100, 0)},
                  probes={"local": FixedProbe(None)}, clock=FakeClock(), engine_api=api)
    gateway_settings = GatewaySettings(config_dir=tmp_path, stats_db=tmp_path / "stats.sqlite3",
                                       nodes={"local": NodeConfig(total_gb=100, reserve_gb=0, unified_memory=False)},
                                       **settings)
    app = create_app(gateway_settings, waker=waker)
    async with waker, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://127.0.0.1:8009") as client:
        yield Gw(client, waker, runtime, api)
        for task in list(app.state.background):
            task.cancel()


# What Open WebUI's llama.cpp provider makes of an entry: its Loaded indicator (backend/open_webui/routers/openai.py,
# get_provider_model_loaded_state, llama.cpp branch, quoted as its code reads). None: no indicator at all.
OPEN_WEBUI_LOADED = {"loaded", "sleeping"}
OPEN_WEBUI_UNLOADED = {"loading", "unloaded"}


def open_webui_loaded(model: dict[str, Any]) -> bool | None:
    status = model.get("status")
    if isinstance(status, dict):
        value = status.get("value")
        if value in OPEN_WEBUI_LOADED:
            return True
        if value in OPEN_WEBUI_UNLOADED:
            return False
    if "status" not in model:
        return True
    return None


# -- status per state ----------------------------------------------------------------------------------------------


async def test_each_state_is_listed_with_llama_cpps_status_and_open_webuis_loaded_indicator(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("m"), auto_ready=False) as gw:
        seen: list[tuple[str, dict[str, Any], bool | None]] = []

        async def look() -> None:
            entry = (await gw.listing())["m"]
            seen.append((entry["state"], entry["status"], open_webui_loaded(entry)))

        await look()  # stopped
        assert (await gw.load("m")).json()["status"] == {"value": "loading"}
        await look()  # starting
        first = await gw.engine(1)
        first.ready.set()
        await gw.reaches("m", S.READY)
        await look()
        first.stop_gate = asyncio.Event()  # its stop hangs until let go
        await gw.unload("m")
        await look()  # stopping
        first.stop_gate.set()
        await gw.reaches("m", S.STOPPED)
        await gw.load("m")
        (await gw.engine(2)).exit(3, "CUDA error: out of memory")  # exits before it is ready
        await gw.reaches("m", S.FAILED)
        await look()
        assert seen == [
            ("stopped", {"value": "unloaded"}, False),
            ("starting", {"value": "loading"}, False),
            ("ready", {"value": "loaded"}, True),
            ("stopping", {"value": "unloaded"}, False),
            ("failed", {"value": "unloaded", "failed": True, "exit_code": 3}, False),
        ]
        failed = (await gw.listing())["m"]
        assert "exited" in failed["error"] and failed["failures"] == 1


async def test_a_sleeping_model_is_sleeping_for_llama_cpp_and_loaded_for_open_webui_and_a_wake_is_loading(
        tmp_path: Path) -> None:
    async with gateway(tmp_path, sleeper("v")) as gw:
        await gw.waker.warm("v")  # up, and its warm over (it counts as waiting until then)
        assert gw.waker.sleep("v")
        await gw.waker.controller("v").settled()
        entry = (await gw.listing())["v"]
        assert (entry["state"], entry["status"], open_webui_loaded(entry)) == ("sleeping", {"value": "sleeping"}, True)
        gw.api.block = asyncio.Event()  # the engine is slow to answer its wake calls
        assert (await gw.load("v")).json()["status"] == {"value": "loading"}
        entry = (await gw.listing())["v"]
        assert (entry["state"], entry["status"]) == ("waking", {"value": "loading"})
        gw.api.block.set()
        await gw.reaches("v", S.READY)


# -- what clients show ---------------------------------------------------------------------------------------------


async def test_entries_carry_a_display_name_a_description_and_the_context_window(tmp_path: Path) -> None:
    big = spec("gpt-oss-120b", engine="vllm", model="openai/gpt-oss-120b", command=None, aliases=["brain"],
               display_name="GPT-OSS 120B", description="the big reasoning model",
               args=["--max-model-len", "131072"])
    small = spec("tiny")
    async with gateway(tmp_path, big, small) as gw:
        listing = await gw.listing()
        entry = listing["gpt-oss-120b"]
        assert entry["name"] == "GPT-OSS 120B" and entry["description"] == "the big reasoning model"
        assert entry["context_length"] == entry["max_model_len"] == 131072
        assert entry["aliases"] == ["brain"]
        alias = listing["brain"]
        assert alias["name"] == "brain \N{RIGHTWARDS ARROW} GPT-OSS 120B" and alias["alias_of"] == "gpt-oss-120b"
        assert alias["max_model_len"] == 131072
        # No display name, no description, no context flag: the id, and no guessed figures.
        assert listing["tiny"]["name"] == "tiny"
        assert not {"description", "context_length", "max_model_len", "aliases"} & set(listing["tiny"])
        # OpenAI's own fields are all there.
        assert {k: entry[k] for k in ("object", "owned_by")} == {"object": "model", "owned_by": "sparkgate"}
        assert isinstance(entry["created"], int)


@pytest.mark.parametrize(("fields", "window"), [
    ({"engine": "vllm", "args": ["--max-model-len", "32768"]}, 32768),
    ({"engine": "vllm", "args": ["--max_model_len=8192"]}, 8192),
    ({"engine": "vllm", "args": ["--max-model-len", "32k"]}, 32000),  # vLLM's human-readable lengths
    ({"engine": "vllm", "args": ["--max-model-len", "1M"]}, 1024**2),
    ({"engine": "vllm", "args": ["--max-model-len", "auto"]}, None),
    ({"engine": "vllm", "args": []}, None),  # the checkpoint's own: not read here
    ({"engine": "sglang", "args": ["--context-length=65536"]}, 65536),
    ({"engine": "trtllm", "args": ["--max_seq_len", "4096"]}, 4096),
    ({"engine": "llamacpp", "args": ["-c", "16384"]}, 16384),
    ({"engine": "llamacpp", "args": ["--ctx-size", "16384", "-np", "4"]}, 4096),  # split between its slots
    ({"engine": "llamacpp", "args": ["-c", "16384", "--parallel", "4", "--kv-unified"]}, 16384),
    ({"engine": "llamacpp", "args": ["-c", "0"]}, None),  # 0: the model's own
    ({"engine": "generic", "args": ["--max-model-len", "4096"]}, None),  # no engine to read it for
    ({"engine": "vllm", "args": ["--max-model-len", "32768"], "context_length": 8000}, 8000),  # the entry wins
])
def test_the_context_window_comes_from_the_entry_or_the_engines_own_flag(fields: dict[str, Any],
                                                                         window: int | None) -> None:
    from gateway.model_list import context_length  # here: a module of its own since issue 18

    entry = spec("m", model="w", command=None if fields["engine"] != "generic" else ["x"], **fields)
    assert context_length(entry) == window


def test_display_fields_never_change_what_runs() -> None:
    # They are policy: editing them must not recreate a container, nor must upgrading to a gateway that has them
    # (the engine's labels hold this hash).
    plain = spec("m")
    described = spec("m", display_name="M", description="a model", context_length=4096)
    assert described.spec_hash() == plain.spec_hash()


# -- hiding aliases ------------------------------------------------------------------------------------------------


async def test_list_aliases_off_lists_each_model_once_and_its_aliases_still_route(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("a", aliases=["brain", "default"]), spec("b"), list_aliases=False) as gw:
        listing = await gw.listing()
        assert set(listing) == {"a", "b"}
        assert listing["a"]["aliases"] == ["brain", "default"]
        assert set(await gw.listing("/models")) == {"a", "b"}
        alias = await gw.client.get("/v1/models/brain")
        assert alias.status_code == 200 and alias.json()["alias_of"] == "a"
        loaded = await gw.load("brain")
        assert loaded.status_code == 200 and loaded.json()["model"] == "a"
        async with gw.waker.lease("default"):  # the way a request by alias goes in
            assert (await gw.listing())["a"]["status"] == {"value": "loaded"}


async def test_aliases_are_listed_by_default_each_named_for_the_model_it_leads_to(tmp_path: Path) -> None:
    # Listed: Open WebUI uses a task model only if its id is in the list, and docs/clients.md names role aliases.
    async with gateway(tmp_path, spec("a", aliases=["brain"])) as gw:
        listing = await gw.listing()
        assert set(listing) == {"a", "brain"}
        assert (listing["a"]["name"], listing["brain"]["name"]) == ("a", "brain \N{RIGHTWARDS ARROW} a")


# -- a list that can't be slow -------------------------------------------------------------------------------------


async def test_the_list_answers_while_a_model_starts_and_docker_is_unreachable(tmp_path: Path) -> None:
    # Open WebUI lists before every chat and task, with a 10 s limit: a list that waits on an engine or on Docker
    # is a "Model not found" there.
    async with gateway(tmp_path, spec("starting"), spec("stopping"), auto_ready=False) as gw:
        await gw.load("stopping")
        stopping = await gw.engine(1)
        stopping.ready.set()
        await gw.reaches("stopping", S.READY)
        stopping.stop_gate = asyncio.Event()  # Docker does not answer its stop
        await gw.unload("stopping")
        await gw.load("starting")  # never becomes ready
        gw.runtime.down = True  # and Docker is unreachable from now on
        for path in ("/v1/models", "/models"):
            resp = await asyncio.wait_for(gw.client.get(path), timeout=1)
            states = {m["id"]: (m["state"], m["status"]["value"]) for m in resp.json()["data"]}
            assert states == {"starting": ("starting", "loading"), "stopping": ("stopping", "unloaded")}
        gw.runtime.down = False  # back, so the gateway's own shutdown does not wait out its stop_retry
        stopping.stop_gate.set()


# -- load and unload -----------------------------------------------------------------------------------------------


async def test_load_answers_at_once_and_a_second_load_joins_the_same_start(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("m"), auto_ready=False) as gw:
        first = await gw.load("m")
        assert first.status_code == 200
        assert first.json() == {"success": True, "model": "m", "status": {"value": "loading"}, "state": "starting"}
        assert (await gw.load("m")).json()["status"] == {"value": "loading"}
        (await gw.engine(1)).ready.set()
        await gw.reaches("m", S.READY)
        again = await gw.load("m")  # loaded already: a success, not llama.cpp's 400
        assert again.status_code == 200 and again.json()["status"] == {"value": "loaded"}
        assert len(gw.runtime.handles) == 1


async def test_load_of_a_model_failing_in_its_backoff_is_refused_with_retry_after(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("m"), auto_ready=False) as gw:
        for number in (1, 2):  # the second failure in a row sets a backoff
            await gw.load("m")
            (await gw.engine(number)).exit(1, "bad weights")
            await gw.reaches("m", S.FAILED)
            await gw.waker.controller("m").settled()
        resp = await gw.load("m")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_start_failed"
        assert int(resp.headers["retry-after"]) >= 1


async def test_unload_stops_an_idle_model_and_answers_at_once(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("m")) as gw:
        await gw.load("m")
        await gw.reaches("m", S.READY)
        engine = await gw.engine(1)
        engine.stop_gate = asyncio.Event()
        resp = await gw.unload("m")
        assert resp.status_code == 200
        assert resp.json() == {"success": True, "model": "m", "status": {"value": "unloaded"}, "state": "stopping"}
        engine.stop_gate.set()
        await gw.reaches("m", S.STOPPED)
        assert engine.exit_code is not None
        stop = next(e for e in gw.waker.events.recent("m") if e.target == "stopping")
        assert stop.reason == "unloaded through /models/unload by key 'anonymous'"
        again = await gw.unload("m")  # stopped already: a success
        assert again.status_code == 200 and again.json()["state"] == "stopped"


async def test_unload_never_stops_a_model_under_a_request(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("m")) as gw:
        async with gw.waker.lease("m"):
            resp = await gw.unload("m")
            assert resp.status_code == 409
            error = resp.json()["error"]
            assert error["code"] == "model_busy" and "serving 1 request" in error["message"]
            assert gw.waker.controller("m").state is S.READY
        assert (await gw.unload("m")).status_code == 200  # idle now
        await gw.reaches("m", S.STOPPED)


async def test_unload_refuses_a_pinned_model_and_an_external_endpoint(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("pin", pinned=True), external("ext")) as gw:
        await gw.load("pin")
        await gw.reaches("pin", S.READY)
        resp = await gw.unload("pin")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "model_pinned"
        assert gw.waker.controller("pin").state is S.READY
        resp = await gw.unload("ext")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_managed"
        assert (await gw.load("ext")).json()["status"] == {"value": "loaded"}


async def test_unload_of_a_start_under_way_cancels_it_and_tells_its_waiters(tmp_path: Path) -> None:
    async with gateway(tmp_path, spec("m"), auto_ready=False) as gw:
        waiting = asyncio.create_task(gw.waker.gate("m").warm())  # a request waiting for the start
        await gw.reaches("m", S.STARTING)
        resp = await gw.unload("m")
        assert resp.status_code == 200 and resp.json()["status"] == {"value": "unloaded"}
        with pytest.raises(StartFailed, match="unloaded through /models/unload"):
            await asyncio.wait_for(waiting, 5)
        await gw.reaches("m", S.STOPPED)


async def test_unload_of_a_sleeping_model_stops_its_engine(tmp_path: Path) -> None:
    async with gateway(tmp_path, sleeper("v")) as gw:
        await gw.waker.warm("v")
        assert gw.waker.sleep("v")
        await gw.waker.controller("v").settled()
        resp = await gw.unload("v")
        assert resp.status_code == 200 and resp.json()["status"] == {"value": "unloaded"}
        await gw.reaches("v", S.STOPPED)
        assert (await gw.engine(1)).exit_code is not None


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'["m"]', 400, "invalid_request"),
    (b"{}", 400, "missing_model"),
    (b'{"model": ""}', 400, "missing_model"),
    (b'{"model": 3}', 400, "invalid_type"),
    (b'{"model": "nobody"}', 404, "model_not_found"),
    (b'{"model": "m", "pad": "' + b"x" * 70_000 + b'"}', 413, "request_too_large"),
])
@pytest.mark.parametrize("path", ["/models/load", "/models/unload"])
async def test_a_bad_load_or_unload_is_an_openai_error_and_changes_nothing(
        tmp_path: Path, path: str, body: bytes, status: int, code: str) -> None:
    async with gateway(tmp_path, spec("m")) as gw:
        resp = await gw.client.post(path, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == status
        assert resp.json()["error"]["code"] == code
        assert gw.runtime.handles == []


# -- scoped by key -------------------------------------------------------------------------------------------------


async def test_load_and_unload_are_scoped_by_key_and_the_admin_key_may_do_both(tmp_path: Path) -> None:
    keys = [{"key": ONLY_A, "name": "laptop", "models": ["a"]}]
    async with gateway(tmp_path, spec("a"), spec("b", aliases=["a-b"]), api_keys=keys, admin_key=ADMIN) as gw:
        assert (await gw.load("b", ADMIN)).status_code == 200
        await gw.reaches("b", S.READY)
        for model in ("b", "a-b"):  # an alias is allowed exactly when its model is
            for operation in (gw.unload, gw.load):
                resp = await operation(model, ONLY_A)
                assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_not_allowed"
        assert gw.waker.controller("b").state is S.READY
        assert set(await gw.listing(key=ONLY_A)) == set(await gw.listing("/models", key=ONLY_A)) == {"a"}
        for key in (None, "sk-wrong-0001"):
            resp = await gw.unload("b", key)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert (await gw.load("a", ONLY_A)).json()["status"]["value"] in ("loading", "loaded")
        await gw.reaches("a", S.READY)
        assert (await gw.unload("a", ONLY_A)).status_code == 200
        resp = await gw.unload("b", ADMIN)
        assert resp.status_code == 200 and resp.json()["status"] == {"value": "unloaded"}
        assert next(e for e in gw.waker.events.recent("b") if e.target == "stopping").reason.endswith("the admin key")
