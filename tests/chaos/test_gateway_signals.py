"""Signals a supervisor sends a real `sparkgate serve` process at awkward moments (issue 17): SIGHUP while it starts
is kept and models.d re-read once it is ready; SIGHUP while it stops is ignored and it still exits cleanly; systemd
hears READY=1 once it serves and STOPPING=1 when it stops; its engine processes die with it when it is SIGKILLed.

Each gateway is started as `sparkgate` starts it (`python -m gateway.command`, the console script's module)."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from tests.chaos.util import REPO, GatewayProcess, alive, free_port, until
from tests.harness import FAKE_ENGINE, fake_engine_spec, write_models

NODES = '{"local": {"total_gb": 128, "memory_probe": "none"}}'


class Gateway(GatewayProcess):
    """GatewayProcess, started through the `sparkgate` entry point, and without waiting for it to serve."""

    async def spawn(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPARKGATE_NODES": NODES, **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.command", "serve", "--config-dir", str(self.config_dir),
            "--port", str(self.port), "--log-level", "info",
            cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())

    async def serving(self, timeout: float = 60) -> None:
        await self.wait_line(lambda line: "Uvicorn running on" in line, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@contextlib.asynccontextmanager
async def gateway(config_dir: Path, env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    gw = Gateway(config_dir, free_port(), env)
    await gw.spawn()
    try:
        yield gw
    finally:
        await gw.kill()


def catches_sighup(pid: int) -> bool:
    """Whether process `pid` handles or ignores SIGHUP now (its SigCgt / SigIgn masks in /proc)."""
    bit = 1 << (signal.SIGHUP - 1)
    with open(f"/proc/{pid}/status") as status:
        masks = dict(line.split(":", 1) for line in status if line.startswith(("SigCgt", "SigIgn")))
    return any(int(mask, 16) & bit for mask in masks.values())


@contextlib.asynccontextmanager
async def docker_that_holds_the_first_call(path: Path) -> AsyncIterator[tuple[asyncio.Event, asyncio.Event]]:
    """A stand-in Docker daemon on a unix socket: its first call is held until `release` is set (`reached` says it
    came); then it answers like a daemon that runs no containers."""
    reached, release = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if not reached.is_set():
            reached.set()
            await release.wait()
        if request.path.endswith("/version"):
            return web.json_response({"ApiVersion": "1.41", "MinAPIVersion": "1.12", "Version": "20.10.24"})
        if request.path.endswith("/_ping"):
            return web.Response(text="OK")
        return web.json_response([])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield reached, release
    finally:
        release.set()
        await runner.cleanup()


async def test_a_sighup_while_the_gateway_starts_is_kept_and_models_d_is_read_again_once_it_serves(
        tmp_path: Path) -> None:
    models = write_models(tmp_path / "models", fake_engine_spec("first"))
    sock = tmp_path / "docker.sock"
    nodes = f'{{"local": {{"total_gb": 128, "memory_probe": "none", "docker_host": "unix://{sock}"}}}}'
    async with docker_that_holds_the_first_call(sock) as (reached, release), \
            gateway(models, {"SPARKGATE_NODES": nodes}) as gw:
        # The gateway is in its app's startup, looking for engines a previous gateway left: it has read models.d
        # and is not ready. A SIGHUP there ended it (the handler came at the end of the startup).
        async with asyncio.timeout(60):
            await reached.wait()
        write_models(models, fake_engine_spec("added"))
        os.kill(gw.pid, signal.SIGHUP)
        release.set()
        await gw.serving()
        reload = await gw.wait_event(lambda e: e["kind"] == "reload", timeout=30)
        assert reload["data"] == {"added": ["added"]}
        async with httpx.AsyncClient(timeout=10) as client:
            listed = (await client.get(gw.v1 + "/models")).json()
        assert {m["id"] for m in listed["data"]} == {"first", "added"}
        assert any("SIGHUP came while the gateway was starting" in line for line in gw.lines)
        gw.terminate()
        assert await gw.wait(timeout=30) == 0, "\n".join(gw.lines[-40:])


async def test_a_sighup_as_soon_as_the_process_catches_it_never_ends_the_gateway(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models", fake_engine_spec("m"))
    async with gateway(models) as gw:
        # The first moment a SIGHUP can be survived: the interpreter is up and `sparkgate` has run its first lines.
        await until(lambda: catches_sighup(gw.pid), 30, "the gateway to catch SIGHUP")
        os.kill(gw.pid, signal.SIGHUP)
        await gw.serving()
        await gw.wait_event(lambda e: e["kind"] == "reload", timeout=30)
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})
        assert answer.status_code == 200
        gw.terminate()
        assert await gw.wait(timeout=30) == 0, "\n".join(gw.lines[-40:])


# An engine that takes its time to stop: SIGTERM ends the fake engine it runs, not itself; the gateway kills it after
# its stop_timeout. Its pid is the process group the gateway signals.
SLOW_TO_STOP = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('TERM ignored', flush=True))\n"
    "subprocess.run(sys.argv[1:])\n"
    "while True:\n"
    "    time.sleep(60)\n"
)


def slow_to_stop_spec(name: str) -> dict[str, Any]:
    return {**fake_engine_spec(name), "stop_timeout": "4s",
            "command": [sys.executable, "-c", SLOW_TO_STOP, sys.executable, FAKE_ENGINE, "--port", "{port}",
                        "--model", "{served_name}"]}


async def test_a_sighup_while_the_gateway_stops_its_engines_is_ignored_and_it_exits_cleanly(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models", slow_to_stop_spec("slow"))
    async with gateway(models) as gw:
        await gw.serving()
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(gw.v1 + "/chat/completions", json={"model": "slow", "messages": []})
        assert answer.status_code == 200
        ready = await gw.wait_event(lambda e: e["model"] == "slow" and e["target"] == "ready", timeout=30)
        engine = int(ready["data"]["engine"].removeprefix("pid "))
        gw.terminate()
        # The gateway stops its engine, which takes its stop_timeout: a SIGHUP now used to end the gateway.
        await gw.wait_event(lambda e: e["model"] == "slow" and e["target"] == "stopping", timeout=30)
        os.kill(gw.pid, signal.SIGHUP)
        assert await gw.wait(timeout=30) == 0, "\n".join(gw.lines[-40:])
        assert any("SIGHUP ignored: the gateway is shutting down" in line for line in gw.lines)
        assert not any("Traceback" in line for line in gw.lines), "\n".join(gw.lines)
        stopped = await gw.wait_event(lambda e: e["model"] == "slow" and e["target"] == "stopped", timeout=1)
        assert stopped["reason"] == "engine stopped"
        assert not alive(engine)


# An engine that writes its environment to argv[1] and exits.
WRITES_ENV = "import json, os, sys\nopen(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))\n"


async def test_systemd_hears_ready_once_the_gateway_serves_and_stopping_when_it_stops(tmp_path: Path) -> None:
    seen_env = tmp_path / "engine-env.json"
    writes_env = {"name": "env", "engine": "generic", "start_timeout": "20s", "min_uptime": 0,
                  "command": [sys.executable, "-c", WRITES_ENV, str(seen_env)]}
    models = write_models(tmp_path / "models", writes_env)
    notify_path = tmp_path / "notify.sock"
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.setblocking(False)
        async with gateway(models, {"NOTIFY_SOCKET": str(notify_path)}) as gw:
            async with asyncio.timeout(60):
                assert await loop.sock_recv(notify, 100) == b"READY=1"
            async with httpx.AsyncClient(timeout=30) as client:
                # Ready means serving: `systemctl restart` returns then, and a reload after it finds it ready.
                assert (await client.get(f"http://127.0.0.1:{gw.port}/health")).status_code == 200
                await client.post(gw.v1 + "/chat/completions", json={"model": "env", "messages": []})
            # Only the gateway speaks to systemd: its engines don't inherit the socket.
            assert "NOTIFY_SOCKET" not in json.loads(seen_env.read_text())
            gw.terminate()
            async with asyncio.timeout(30):
                assert await loop.sock_recv(notify, 100) == b"STOPPING=1"
            assert await gw.wait(timeout=30) == 0, "\n".join(gw.lines[-40:])


def gone(pid: int) -> bool:
    """No such process, or only its zombie (whoever inherited it has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_engine_processes_die_with_a_gateway_that_is_killed_outright(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models", fake_engine_spec("m"))
    async with gateway(models) as gw:
        await gw.serving()
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})
        assert answer.status_code == 200
        ready = await gw.wait_event(lambda e: e["model"] == "m" and e["target"] == "ready", timeout=30)
        engine = int(ready["data"]["engine"].removeprefix("pid "))
        assert not gone(engine)
        assert gw.proc is not None
        gw.proc.kill()  # SIGKILL: no shutdown runs; only the kernel can end the engine now (its parent-death signal)
        await gw.wait(timeout=30)
        await until(lambda: gone(engine), 10, f"engine pid {engine} to die with the gateway")

