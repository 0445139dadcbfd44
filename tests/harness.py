"""Run a real gateway (uvicorn on a real socket) inside the test's event loop."""

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from aiohttp import web

from gateway.app import build_waker, create_app
from gateway.settings import GatewaySettings
from waker.config.registry import load_dir
from waker.waker import Waker

FAKE_ENGINE = str(Path(__file__).with_name("fake_engine.py"))


def fake_engine_spec(name: str, *flags: str, **fields: Any) -> dict[str, Any]:
    """A models.d entry that runs tests/fake_engine.py as a process."""
    return {
        "name": name,
        "engine": "generic",
        "command": [sys.executable, FAKE_ENGINE, "--port", "{port}", "--model", "{served_name}", *flags],
        "start_timeout": "20s",
        "stop_timeout": "5s",
        "min_uptime": 0,
        **fields,
    }


def write_models(directory: Path, *specs: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (directory / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    return directory


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    waker: Waker
    server: uvicorn.Server

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def starts(self, model: str) -> int:
        return sum(1 for e in self.waker.events.recent(model) if e.kind == "transition" and e.target == "starting")


@contextlib.asynccontextmanager
async def run_gateway(
    config_dir: Path, probes: dict[str, Any] | None = None, *, http: str = "httptools", **settings: Any
) -> AsyncIterator[Gateway]:
    """`http`: uvicorn's HTTP protocol, "httptools" as `sparkgate serve` runs it, or "h11" (the proxy relays a
    stream's body through ASGI's send there: gateway/proxy.py `_client_stream`)."""
    # One Docker "instance" per test process: concurrent test runs on one daemon leave each other alone.
    settings.setdefault("instance", f"test-{os.getpid()}")
    settings.setdefault("stats_db", config_dir / ".stats.sqlite3")  # never the user's own stats file
    # A DGX Spark's total unless the test says otherwise: unset, it would be read from the machine running the tests.
    settings.setdefault("nodes", {"local": {"total_gb": 128}})
    gateway_settings = GatewaySettings(config_dir=config_dir, port=0, **settings)
    waker = build_waker(gateway_settings, load_dir(config_dir), probes)
    app = create_app(gateway_settings, waker=waker)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            http=http, loop="asyncio")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for "listening"
        if serving.done():
            serving.result()
            raise RuntimeError("gateway exited during startup")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Gateway(f"http://127.0.0.1:{port}", waker, server)
    finally:
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[int]:
    """A small aiohttp app (a stand-in engine) on a free loopback port; yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
