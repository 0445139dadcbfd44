"""The app factory: builds the waker, the upstream client and the routes for one gateway."""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.routing import Route, WebSocketRoute

from gateway import errors
from gateway import upstream as upstream_client
from gateway.admin import reload_config
from gateway.admin import router as admin_router
from gateway.auth import Door, KeyRing, is_loopback, load_keys
from gateway.background import spawn
from gateway.config import load_models
from gateway.engine_routes import EngineRoutes
from gateway.errors import ApiError
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.routes import router
from gateway.service import Hangup
from gateway.services import Services
from gateway.settings import GatewaySettings
from stats import Sampler, SampleStore, StoreUnavailable
from waker import compose
from waker.config.registry import ConfigError, Registry, fingerprint
from waker.options import WakerOptions
from waker.scheduling.budget import MemoryProbe
from waker.scheduling.node import QueuePolicy
from waker.waker import Waker

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("sparkgate.gateway")


def _spawn(app: FastAPI, coro: Coroutine[Any, Any, None]) -> None:
    spawn(app.state.background, coro, "models.d reload")


async def reload_logged(app: FastAPI) -> None:
    """A reload whose outcome is logged, for the file watch and SIGHUP (no caller to answer): nothing it raises may
    end the watch or be left in a task no one awaits."""
    try:
        report = await reload_config(app)
        log.info("models.d reloaded: %s", {k: v for k, v in report.items() if v and k != "unchanged"})
    except ConfigError as exc:
        log.error("models.d NOT reloaded (the running config keeps serving): %s", exc)
    except Exception:
        log.exception("models.d NOT reloaded (the running config keeps serving): the reload failed")


async def watch_config(app: FastAPI, interval: float = 2.0, *,
                       tick: Callable[[], Awaitable[object]] | None = None) -> None:
    """Reload when models.d changes, polling each model file's inode, size and times (works on every filesystem
    and mount; waker/config/registry.py `fingerprint`). A change is applied once two polls in a row agree, so a
    file caught mid-write is not read half written, and each change once: a models.d that fails to load is logged
    once, and the next edit is read again. Nothing a poll raises ends the watch (it used to die for good on one
    bad file). `tick` waits between polls: `interval` seconds, or a step a test takes
    (tests/unit/gateway/test_watch_config.py)."""
    directory: Path = app.state.settings.config_dir
    wait = tick or functools.partial(asyncio.sleep, interval)
    applied = seen = await asyncio.to_thread(fingerprint, directory)
    while True:
        await wait()
        try:
            now = await asyncio.to_thread(fingerprint, directory)
            if now == seen and now != applied:
                applied = now
                await reload_logged(app)
            seen = now
        except Exception:
            log.exception("models.d watch: a poll failed; still watching")


class GatewayApp(FastAPI):
    """FastAPI, with the proxy's routes dispatched before the router and middleware stack: they are
    every token users see, and need none of it (the proxy does its own errors). Every HTTP request
    passes the door first (gateway/auth.py::Door): foreign hosts, origins and non-JSON bodies stop there."""

    fast_proxy: Proxy | None = None
    door: Door | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if self.door is not None and scope["type"] == "http":
            refusal = self.door.refusal(scope["method"], scope["headers"], scope["path"])
            if refusal is not None:
                await send({"type": "http.response.start", "status": refusal.status, "headers": refusal.headers()})
                await send({"type": "http.response.body", "body": refusal.body()})
                return
        proxy = self.fast_proxy
        if proxy is not None and scope["type"] == "http" and scope["method"] == "POST" \
                and scope["path"].startswith("/v1/"):
            await proxy(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def require_metrics_key(request: Request) -> None:
    """/metrics and /metrics/engines name every model and every key with its traffic, and the second
    makes the gateway scrape every engine: the admin key or a key marked `metrics`, or (setting
    metrics_loopback_open) a client on loopback, such as a local Prometheus."""
    settings: GatewaySettings = request.app.state.settings
    if settings.metrics_loopback_open and request.client is not None and is_loopback(request.client.host):
        return
    keys: KeyRing = request.app.state.keys
    allowed = keys.may_read_metrics(request.headers.get("authorization"))
    if allowed is None:
        raise errors.metrics_key_required()
    if not allowed:
        raise errors.metrics_not_allowed()


def build_waker(settings: GatewaySettings, registry: Registry | None = None,
                probes: Mapping[str, MemoryProbe] | None = None) -> Waker:
    """The waker for `settings`: models.d (or `registry`), the nodes with their budgets, labels and probes."""
    options = WakerOptions(probe_interval=settings.probe_interval, probe_timeout=settings.probe_timeout,
                           reap_interval=settings.reap_interval, log_tail_lines=settings.log_tail_lines,
                           backoff_cap=settings.backoff_cap, stop_retry=settings.stop_retry)
    queue = QueuePolicy(max_queue=settings.max_queue, max_wait=settings.max_wait, max_hold=settings.max_hold)
    nodes = compose.resolve_nodes(settings.nodes)  # once: `sparkgate serve` passes them resolved already
    return compose.build_waker(registry or load_models(settings.config_dir, settings.stats_db, nodes,
                                                            gateway=(settings.host, settings.port)), nodes,
                               options=options, queue=queue, preload=settings.preload, instance=settings.instance,
                               memory_probes=probes)


def create_app(settings: GatewaySettings, registry: Registry | None = None, waker: Waker | None = None,
               hangup: Hangup | None = None) -> FastAPI:
    """One gateway. `registry` defaults to settings.config_dir; `waker` may be given by tests; `hangup` by
    `sparkgate serve`, which catches SIGHUP from its start."""
    hangup = hangup or Hangup()
    # Each node's memory, read once (no-op for nodes `sparkgate serve` resolved): budgets, reloads and status use it.
    settings = settings.model_copy(update={"nodes": compose.resolve_nodes(settings.nodes)})
    keys = KeyRing(load_keys(settings.api_keys, settings.api_keys_file), settings.admin_key)
    if waker is None:
        waker = build_waker(settings, registry)
    session: aiohttp.ClientSession | None = None
    pool: upstream_client.Pool | None = None
    metrics = Metrics(waker, live_memory=lambda: s.latest if (s := getattr(app.state, "sampler", None)) else None)

    def upstream() -> aiohttp.ClientSession:
        assert session is not None, "the app's lifespan has not started"
        return session

    def engines() -> upstream_client.Pool:
        assert pool is not None, "the app's lifespan has not started"
        return pool

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal session, pool
        # The proxy's own client for the engines' OpenAI routes (gateway/upstream.py); aiohttp for the rest.
        pool = upstream_client.Pool(settings.upstream_connect_timeout)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            # Bytes pass through untouched: no decompression, no re-encoding.
            auto_decompress=False,
            # One session serves every client: an engine's cookies must never reach another client's
            # requests (and not keeping any saves a jar lookup per request).
            cookie_jar=aiohttp.DummyCookieJar(),
            # Silence from an engine (upstream_read_timeout) is watched by the proxy, one timer per request.
            timeout=aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout),
        )
        _spawn(app, metrics.follow())  # before the waker starts: boot events are counted too
        # SIGHUP re-reads models.d, like most daemons; while the gateway starts it is remembered, while it stops
        # ignored (gateway/service.py::Hangup). `sparkgate serve` catches it from its first line, an app run otherwise
        # from here until it has stopped.
        hangup_owned = hangup.install()
        async with waker:
            sampler = None
            app.state.stats_off = None if settings.stats_interval > 0 else "stats_interval is 0"
            if settings.stats_interval > 0:
                try:
                    store = SampleStore(settings.stats_db)
                except StoreUnavailable as exc:  # statistics are optional: a bad file must not keep the gateway down
                    log.warning("stats disabled: %s", exc)
                    app.state.stats_off = str(exc)
                else:
                    # settings.nodes are resolved (create_app): their unified_memory picks the machines whose
                    # starts are measured by what MemAvailable loses (stats/unified.py).
                    sampler = Sampler(waker, store, interval=settings.stats_interval, nodes=settings.nodes,
                                      events=waker.events)
                    sampler.start()
            app.state.sampler = sampler
            watchers = [asyncio.create_task(watch_config(app), name="models.d watch")] if settings.watch_config else []
            hangup.ready(asyncio.get_running_loop(), lambda: _spawn(app, reload_logged(app)))
            try:
                yield
            finally:
                hangup.stopping()
                for task in [*watchers, *app.state.background]:
                    task.cancel()
                if sampler is not None:
                    await sampler.close()
                    sampler.store.close()
                await session.close()
                pool.close()
        if hangup_owned:
            hangup.restore()

    app = GatewayApp(title="sparkgate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.waker = waker
    app.state.settings = settings
    app.state.created = int(time.time())
    app.state.keys = keys
    app.state.background = set()
    app.include_router(router)
    app.include_router(admin_router)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_key)])
    async def gateway_metrics() -> Response:
        """Prometheus: requests, latency, TTFB, cold starts, wakes, evictions, queue, states, budget, memory."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/metrics/engines", include_in_schema=False, dependencies=[Depends(require_metrics_key)])
    async def engine_metrics() -> Response:
        """Each ready engine's own metrics (vllm:*, sglang:* ...) with a `model` label; separate so a slow
        engine never delays /metrics."""
        return Response(await metrics.scrape_engines(upstream(), timeout=2.0), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def status_page() -> FileResponse:
        """The status page: models, the memory budget, live events (no build step, no CDN)."""
        return FileResponse(STATIC / "status.html", media_type="text/html")
    # The proxy is a plain ASGI endpoint (no per-request framework work on the hot path).
    app.state.metrics = metrics
    proxy = Proxy(waker, settings, engines, keys, metrics)
    app.router.routes.append(Route("/v1/{path:path}", proxy, methods=["POST"]))
    # An engine's own routes that its adapter allows (tokenize, props...): every method reaches it, to be refused there.
    app.router.routes.append(Route("/engines/{path:path}", EngineRoutes(waker, settings, upstream, keys)))
    # Without CORS (which must wrap every response) POST /v1/* skips the framework entirely.
    app.fast_proxy = None if settings.cors_origins else proxy
    # Non-JSON bodies are refused only without client keys: with keys, a page can't send one with a key
    # (the Authorization header needs a preflight, which CORS answers).
    app.door = Door(settings.host, settings.allowed_hosts, settings.cors_origins, json_only=not keys.enabled)
    # Services (engine: service) under /services/<name>/: every method, and WebSockets, which the door checks there.
    services = Services(waker, settings, upstream, keys, metrics, app.door)
    app.router.routes.append(Route("/services/{name}", services))
    app.router.routes.append(Route("/services/{name}/{path:path}", services))
    app.router.routes.append(WebSocketRoute("/services/{name}/{path:path}", services))
    if settings.cors_origins:
        # Open WebUI (and other browser clients) call the API from another origin.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After", "retry-after-ms", "x-should-retry"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return Response(exc.body(), status_code=exc.status, headers=dict(
            (k.decode(), v.decode()) for k, v in exc.headers()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return Response(error.body(), status_code=error.status, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = ApiError(400, str(exc), code="invalid_request")
        return Response(error.body(), status_code=400, media_type="application/json")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
        return Response(error.body(), status_code=500, media_type="application/json")

    return app
