"""The gateway is the only door: metrics need a key, web pages can't steer a keyless gateway (Origin, Host,
non-JSON bodies), engine metrics are read whole, a key's globs match models and not their aliases."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_waker, create_app
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings
from tests.harness import Gateway, fake_engine_spec, run_gateway, serve_app, write_models
from waker.config.registry import load_dir

KEYS = [{"key": "sk-laptop-123", "name": "laptop", "models": ["small*"]},
        {"key": "sk-server-456", "name": "server"}]
PROMETHEUS = {"key": "sk-prometheus-1", "name": "prometheus", "models": [], "metrics": True}
ADMIN = "admin-secret-1"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [], "max_tokens": 1}


def code(resp: httpx.Response) -> tuple[int, str | None]:
    return resp.status_code, resp.json()["error"]["code"] if resp.status_code >= 400 else None


@asynccontextmanager
async def stand_in_engine(metrics_page: bytes = b"") -> AsyncIterator[str]:
    """An engine run by hand (runtime external): chat answers and a /metrics page; yields its /v1 URL."""

    async def chat_handler(request: web.Request) -> web.Response:
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics_page, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_handler)
    app.router.add_get("/metrics", metrics_handler)
    async with serve_app(app) as port:
        yield f"http://127.0.0.1:{port}/v1"


def port_of(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


# -- 1. metrics need a key --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/metrics/engines"])
async def test_metrics_need_the_admin_key_or_a_key_marked_metrics(tmp_path: Path, path: str) -> None:
    models = write_models(tmp_path, fake_engine_spec("small-one"), fake_engine_spec("big-one"))
    async with run_gateway(models, api_keys=[*KEYS, PROMETHEUS], admin_key=ADMIN) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        url = gw.url + path
        assert code(await client.get(url)) == (401, "metrics_key_required")
        assert code(await client.get(url, headers=bearer("wrong-key-000"))) == (401, "metrics_key_required")
        # A client key sees only its models: the metrics name them all, and every other key with its traffic.
        assert code(await client.get(url, headers=bearer("sk-laptop-123"))) == (403, "metrics_not_allowed")
        assert code(await client.get(url, headers=bearer("sk-server-456"))) == (403, "metrics_not_allowed")
        assert (await client.get(url, headers=bearer("sk-prometheus-1"))).status_code == 200
        assert (await client.get(url, headers=bearer(ADMIN))).status_code == 200
        if path == "/metrics":
            assert 'model="big-one"' in (await client.get(url, headers=bearer(ADMIN))).text


async def test_metrics_with_only_an_admin_key_need_it(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, admin_key=ADMIN) as gw, httpx.AsyncClient(timeout=30) as client:
        assert code(await client.get(gw.url + "/metrics")) == (401, "metrics_key_required")
        assert (await client.get(gw.url + "/metrics", headers=bearer(ADMIN))).status_code == 200


async def test_metrics_open_to_loopback_only_when_told(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, api_keys=[*KEYS, PROMETHEUS], metrics_loopback_open=True) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(gw.url + "/metrics")).status_code == 200  # a local Prometheus, no key
        assert (await client.get(gw.url + "/metrics/engines")).status_code == 200
    # The same setting does nothing for a client elsewhere on the network.
    settings = GatewaySettings(config_dir=models, api_keys=[*KEYS, PROMETHEUS], metrics_loopback_open=True,
                               stats_db=tmp_path / "stats.sqlite3", nodes={"local": {"total_gb": 128}})
    app = create_app(settings, waker=build_waker(settings, load_dir(models)))
    transport = httpx.ASGITransport(app=app, client=("192.168.1.5", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://192.168.1.5:8009") as remote:
        assert code(await remote.get("/metrics")) == (401, "metrics_key_required")
        assert (await remote.get("/metrics", headers=bearer("sk-prometheus-1"))).status_code == 200


async def test_metrics_of_a_gateway_without_keys_stay_open(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(gw.url + "/metrics")).status_code == 200
        assert (await client.get(gw.url + "/metrics/engines")).status_code == 200
        # ...but the door still applies: a rebinding page's Host, a foreign page's Origin.
        rebound = await client.get(gw.url + "/metrics", headers={"Host": f"evil.example:{port_of(gw)}"})
        assert code(rebound) == (403, "host_not_allowed")
        foreign = await client.get(gw.url + "/metrics", headers={"Origin": "http://evil.example"})
        assert code(foreign) == (403, "origin_not_allowed")


# -- 2. cross-site requests to a keyless gateway ----------------------------------------------------------


async def test_a_web_page_cannot_steer_a_keyless_gateway(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        port = port_of(gw)
        evil = {"Origin": "http://evil.example"}
        # A foreign page's fetch(): start, stop and reload need no preflight without a body or with text/plain.
        assert code(await client.post(gw.url + "/admin/models/m/start", headers=evil)) == (403, "origin_not_allowed")
        assert code(await client.post(gw.url + "/admin/reload", headers=evil)) == (403, "origin_not_allowed")
        assert code(await client.post(gw.v1 + "/chat/completions", json=chat("m"), headers=evil)) == \
            (403, "origin_not_allowed")
        assert code(await client.post(gw.url + "/admin/models/m/start", headers={"Origin": "null"})) == \
            (403, "origin_not_allowed")  # a sandboxed iframe or a file:// page
        # A text/plain or form body (no preflight), even without an Origin header.
        text_plain = await client.post(gw.v1 + "/chat/completions", content=b'{"model": "m", "messages": []}',
                                       headers={"Content-Type": "text/plain"})
        assert code(text_plain) == (403, "json_required")
        form = await client.post(gw.v1 + "/chat/completions", data={"model": "m"})
        assert code(form) == (403, "json_required")
        blob = await client.post(gw.url + "/admin/models/m/start", content=b"x",
                                 headers={"Content-Type": "application/octet-stream"})
        assert code(blob) == (403, "json_required")
        # DNS rebinding: the attacker's name now points at 127.0.0.1, so the page is "same origin".
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        assert code(await client.post(gw.url + "/admin/models/m/start", headers=rebound)) == (403, "host_not_allowed")
        assert code(await client.get(gw.url + "/admin/state", headers={"Host": f"evil.example:{port}"})) == \
            (403, "host_not_allowed")
        assert code(await client.post(gw.v1 + "/chat/completions", json=chat("m"), headers=rebound)) == \
            (403, "host_not_allowed")
        assert gw.starts("m") == 0


async def test_own_origin_listed_origins_and_hosts_and_server_side_clients_pass(tmp_path: Path) -> None:
    async with stand_in_engine() as url:
        models = write_models(tmp_path, {"name": "m", "runtime": "external", "url": url})
        async with run_gateway(models, cors_origins=["http://webui.local"], allowed_hosts=["Spark.LAN"]) as gw, \
                httpx.AsyncClient(timeout=30) as client:
            port = port_of(gw)
            chat_url = gw.v1 + "/chat/completions"
            assert (await client.post(chat_url, json=chat("m"))).status_code == 200  # no Origin: an SDK
            for host in [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"spark.lan:{port}", "spark.lan",
                         f"192.168.1.5:{port}"]:
                resp = await client.post(chat_url, json=chat("m"), headers={"Host": host, "Origin": f"http://{host}"})
                assert resp.status_code == 200, host
            listed = await client.post(chat_url, json=chat("m"), headers={"Origin": "http://webui.local"})
            assert listed.status_code == 200
            typed = await client.post(chat_url, content=b'{"model": "m", "messages": []}',
                                      headers={"Content-Type": "application/json; charset=utf-8"})
            assert typed.status_code == 200
            # The status page's buttons: a same-origin POST without a body.
            own = await client.post(gw.url + "/admin/models/m/stop", headers={"Origin": f"http://127.0.0.1:{port}"})
            assert own.status_code == 200
            assert (await client.get(gw.url + "/admin/state", headers={"Host": f"localhost:{port}"})).status_code == 200
            # A preflight is CORS's to answer (it changes nothing).
            preflight = await client.options(chat_url, headers={"Origin": "http://webui.local",
                                                                "Access-Control-Request-Method": "POST"})
            assert preflight.status_code == 200


async def test_origin_and_host_are_checked_with_keys_too(tmp_path: Path) -> None:
    async with stand_in_engine() as url:
        models = write_models(tmp_path, {"name": "small-m", "runtime": "external", "url": url})
        async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
            key = bearer("sk-laptop-123")
            chat_url = gw.v1 + "/chat/completions"
            foreign = await client.post(chat_url, json=chat("small-m"), headers={**key, "Origin": "http://evil.example"})
            assert code(foreign) == (403, "origin_not_allowed")
            rebound = await client.post(chat_url, json=chat("small-m"),
                                        headers={**key, "Host": f"evil.example:{port_of(gw)}"})
            assert code(rebound) == (403, "host_not_allowed")
            # With keys a page can't send a key without a preflight: the body's type is the proxy's business.
            untyped = await client.post(chat_url, content=b'{"model": "small-m", "messages": []}',
                                        headers={**key, "Content-Type": "text/plain"})
            assert untyped.status_code == 200


# -- 3. engine metrics are read whole ---------------------------------------------------------------------


def metrics_page(samples: int) -> bytes:
    lines = ["# HELP vllm:test_series A series to make the page big.", "# TYPE vllm:test_series gauge"]
    lines += [f'vllm:test_series{{i="{i}",padding="{"p" * 40}"}} {i}' for i in range(samples)]
    return ("\n".join(lines) + "\n").encode()


async def test_engine_metrics_page_is_read_whole_and_one_over_the_limit_fails(tmp_path: Path) -> None:
    page = metrics_page(3000)
    assert len(page) > 200_000
    async with stand_in_engine(page) as url:
        models = write_models(tmp_path, {"name": "big-page", "runtime": "external", "engine": "vllm", "url": url})
        async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
            text = (await client.get(gw.url + "/metrics/engines")).text
            series = {s.labels["i"]: s for family in text_string_to_metric_families(text) for s in family.samples
                      if s.name == "vllm:test_series"}
            assert len(series) == 3000
            assert 'sparkgate_engine_scrape_success{model="big-page"} 1.0' in text

            metrics: Metrics = gw.server.config.app.state.metrics
            async with aiohttp.ClientSession() as session:
                over = (await metrics.scrape_engines(session, max_bytes=100_000)).decode()
            assert 'sparkgate_engine_scrape_success{model="big-page"} 0.0' in over
            assert "vllm:test_series" not in over


# -- 4. a key's globs match model names, not aliases -------------------------------------------------------


async def test_a_keys_glob_matching_an_alias_does_not_grant_the_model_behind_it(tmp_path: Path) -> None:
    async with stand_in_engine() as url:
        models = write_models(tmp_path, {"name": "small-one", "runtime": "external", "url": url},
                              {"name": "big", "runtime": "external", "url": url, "aliases": ["small-x"]},
                              {"name": "small-two", "runtime": "external", "url": url, "aliases": ["tiny"]})
        async with run_gateway(models, api_keys=KEYS) as gw, httpx.AsyncClient(timeout=30) as client:
            laptop = bearer("sk-laptop-123")  # models: ["small*"]
            chat_url = gw.v1 + "/chat/completions"
            assert code(await client.post(chat_url, json=chat("small-x"), headers=laptop)) == \
                (403, "model_not_allowed")
            assert code(await client.post(chat_url, json=chat("big"), headers=laptop)) == (403, "model_not_allowed")
            listing = (await client.get(gw.v1 + "/models", headers=laptop)).json()
            assert sorted(m["id"] for m in listing["data"]) == ["small-one", "small-two", "tiny"]
            assert (await client.get(gw.v1 + "/models/small-x", headers=laptop)).status_code == 404
            # An alias is allowed exactly when its model is: `tiny` matches no glob, but small-two does.
            assert (await client.post(chat_url, json=chat("tiny"), headers=laptop)).status_code == 200
            # A key allowed everything still uses the alias.
            assert (await client.post(chat_url, json=chat("small-x"), headers=bearer("sk-server-456"))).status_code \
                == 200
