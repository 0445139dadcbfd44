"""Operating the gateway: admin API, events stream, hot reload, the CLI."""

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.cli import main as cli
from tests.harness import fake_engine_spec, run_gateway, write_models


async def test_admin_api_starts_stops_pins_and_shows_logs(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m", aliases=["alias"]), fake_engine_spec("other"))
    async with run_gateway(models) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        started = await client.post("/admin/models/alias/start")
        assert started.status_code == 202
        await gw.waker.events.wait_for(lambda e: e.model == "m" and e.target == "ready", 20)
        state = {m["name"]: m for m in (await client.get("/admin/state")).json()["models"]}
        assert state["m"]["state"] == "ready" and state["other"]["state"] == "stopped"
        logs = (await client.get("/admin/models/m/logs?lines=5")).json()
        assert any("fake engine m starting" in line for line in logs["lines"])
        assert (await client.post("/admin/models/m/pin")).json() == {"model": "m", "pinned": True}
        assert gw.waker.describe().model("m").pinned
        await client.post("/admin/models/m/unpin")
        refused = await client.post("/admin/models/m/sleep")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_sleep_mode"
        stopped = await client.post("/admin/models/m/stop")
        assert stopped.json() == {"model": "m", "state": "stopped"}
        assert (await client.post("/admin/models/nope/stop")).status_code == 404


async def test_events_stream_sends_recent_then_live_events(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})
        seen: list[dict] = []
        async with client.stream("GET", gw.url + "/admin/events?recent=10") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                if line == ": live":
                    stop = asyncio.create_task(gw.waker.stop("m"))
                if seen and seen[-1].get("target") == "stopped":
                    break
            await stop
        assert seen[0]["model"] == "m"
        assert [e["target"] for e in seen if e["kind"] == "transition"][-2:] == ["stopping", "stopped"]


async def test_reload_keeps_running_engines_and_applies_changes_when_idle(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("keep"), fake_engine_spec("change"), fake_engine_spec("drop"),
                          fake_engine_spec("policy"))
    async with run_gateway(models) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        for name in ("keep", "change", "drop", "policy"):
            assert (await client.post("/v1/chat/completions", json={"model": name, "messages": []})).status_code == 200
        pids = {n: gw.waker.controller(n).handle.pid for n in ("keep", "change", "drop", "policy")}

        write_models(models, fake_engine_spec("change", "--token-delay", "0"), fake_engine_spec("new"),
                     fake_engine_spec("policy", idle_timeout="2h"))
        (models / "drop.yaml").unlink()
        report = (await client.post("/admin/reload")).json()
        assert report["added"] == ["new"] and report["removed"] == ["drop"]
        assert report["changed"] == ["change"] and report["updated"] == ["policy"]
        assert report["unchanged"] == ["keep"]

        assert gw.waker.controller("keep").handle.pid == pids["keep"]  # untouched
        assert gw.waker.controller("policy").handle.pid == pids["policy"]  # policy-only: engine kept
        assert gw.waker.controller("policy").spec.idle_timeout == 7200
        await gw.waker.events.wait_for(lambda e: e.model == "change" and e.kind == "reconfigured", 10)
        reply = await client.post("/v1/chat/completions", json={"model": "change", "messages": []})
        assert reply.status_code == 200
        assert gw.waker.controller("change").handle.pid != pids["change"]  # recreated with the new entry
        gone = await client.post("/v1/chat/completions", json={"model": "drop", "messages": []})
        assert gone.status_code == 404
        with pytest.raises(ProcessLookupError):
            os.kill(pids["drop"], 0)


async def test_invalid_reload_is_refused_and_the_old_config_keeps_serving(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        pid = gw.waker.controller("m").handle.pid
        (models / "broken.yaml").write_text("name: x\nidle_timeout: soon\n")
        refused = await client.post("/admin/reload")
        assert refused.status_code == 422
        assert "broken.yaml: idle_timeout" in refused.json()["error"]["message"]
        reply = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert reply.status_code == 200 and gw.waker.controller("m").handle.pid == pid


async def test_sighup_and_file_watch_reload(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models, watch_config=True) as gw:
        write_models(models, fake_engine_spec("by-watch"))
        event = await gw.waker.events.wait_for(lambda e: e.kind == "reload", 15)
        assert event.data == {"added": ["by-watch"]}
        (models / "by-signal.yaml").write_text(yaml.safe_dump(fake_engine_spec("by-signal")))
        os.kill(os.getpid(), signal.SIGHUP)
        await gw.waker.events.wait_for(lambda e: e.kind == "reload" and "by-signal" in e.data.get("added", []), 15)
        assert "by-signal" in gw.waker.registry


async def test_cli_status_warm_logs_stop_and_reload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = write_models(tmp_path, fake_engine_spec("m", "--ready-after", "1"))
    async with run_gateway(models) as gw:
        url = ["--url", gw.url]
        assert await asyncio.to_thread(cli, ["status", *url]) == 0
        out = capsys.readouterr().out
        assert "MODEL" in out and "m " in out and "stopped" in out and "node local: 0/120 GB held" in out

        assert await asyncio.to_thread(cli, ["warm", "m", *url]) == 0
        out = capsys.readouterr().out
        assert "m: starting" in out and "m: ready after" in out

        assert await asyncio.to_thread(cli, ["logs", "m", "--lines", "3", *url]) == 0
        assert "fake engine m starting" in capsys.readouterr().out
        assert await asyncio.to_thread(cli, ["stop", "m", *url]) == 0
        assert capsys.readouterr().out.strip() == "m: stopped"
        assert await asyncio.to_thread(cli, ["reload", *url]) == 0
        assert "unchanged: 1 model(s) kept running untouched" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="does not exist"):
            await asyncio.to_thread(cli, ["stop", "nope", *url])


async def test_cli_warm_reports_a_failed_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = write_models(tmp_path, fake_engine_spec("bad", "--exit-at-start", "2"))
    async with run_gateway(models) as gw:
        assert await asyncio.to_thread(cli, ["warm", "bad", "--url", gw.url]) == 1
        out = capsys.readouterr().out
        assert "bad: failed: bad exited with code 2 during start" in out
        assert "error: out of memory while loading weights" in out
