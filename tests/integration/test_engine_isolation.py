"""The gateway keeps its secrets from its engines: a real `sparkgate serve` started with client and admin keys runs
a process engine that prints its environment and fails; neither the 503 its client gets (which carries the
engine's last lines) nor the engine's environment holds a key."""

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.harness import write_models

REPO = Path(__file__).resolve().parents[2]
CLIENT_KEY = "sk-client-7f3a9c-secret"
ADMIN_KEY = "sk-admin-51be0d-secret"
OTHER_SECRET = "sk-openai-0c4e2b-secret"

# Writes its environment as JSON to argv[1], prints every variable, exits 1: its output is the failed start's tail.
PRINTS_ENV = ("import json, os, sys\n"
              "open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))\n"
              "print('\\n'.join(f'{k}={v}' for k, v in sorted(os.environ.items())), flush=True)\n"
              "sys.exit(1)\n")


@contextlib.asynccontextmanager
async def sparkgate_serve(config_dir: Path, env: dict[str, str]) -> AsyncIterator[str]:
    """`sparkgate serve` as its own process on a free port; yields its URL once it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config-dir", str(config_dir), "--port", "0",
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    said: list[str] = []
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(30):
            while line := (await proc.stderr.readline()).decode():
                said.append(line)
                if found := re.search(r"Uvicorn running on (http://\S+)", line):
                    url = found.group(1)
                    break
            else:
                pytest.fail("the gateway exited during startup:\n" + "".join(said))
        drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        if drain is not None:
            await drain


async def test_an_engine_started_by_a_gateway_with_keys_sees_none_of_them(tmp_path: Path) -> None:
    seen = tmp_path / "engine-env.json"
    models = write_models(tmp_path / "models.d", {
        "name": "leaky", "engine": "generic", "command": [sys.executable, "-c", PRINTS_ENV, str(seen)],
        "start_timeout": "20s", "min_uptime": 0, "env": {"ENGINE_FLAVOUR": "isolated"},
    })
    env = {
        "SPARKGATE_API_KEYS": json.dumps([{"key": CLIENT_KEY, "name": "laptop", "models": ["*"]}]),
        "SPARKGATE_ADMIN_KEY": ADMIN_KEY,
        "OPENAI_API_KEY": OTHER_SECRET,
        "SPARKGATE_STATS_DB": str(tmp_path / "stats.sqlite3"),
        "SPARKGATE_STATS_INTERVAL": "0",
        "SPARKGATE_NODES": '{"local": {"total_gb": 128}}',
        "SPARKGATE_LOG_TAIL_LINES": "1000",  # every line the engine printed comes back
    }
    async with sparkgate_serve(models, env) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        answer = await client.post("/v1/chat/completions", json={"model": "leaky", "messages": []},
                                   headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        logs = await client.get("/admin/models/leaky/logs?lines=1000",
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert answer.status_code == 503, answer.text
    body = answer.json()["error"]["message"]
    assert "ENGINE_FLAVOUR=isolated" in body  # the engine's environment did come back in the answer...
    engine_env = json.loads(seen.read_text())
    for secret in (CLIENT_KEY, ADMIN_KEY, OTHER_SECRET):  # ...without a key in it, nor in the engine at all
        assert secret not in body
        assert secret not in logs.text
        assert secret not in json.dumps(engine_env)
    assert not [name for name in engine_env if name.startswith("SPARKGATE_")]
    assert engine_env["ENGINE_FLAVOUR"] == "isolated" and engine_env["PATH"]
