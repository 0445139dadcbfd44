"""End to end with a REAL third-party engine: llama-cpp-python's OpenAI server on a tiny local model.

Needs `pip install -e '.[engine]'` (make test does it). Deselect with `-m "not engine"` on a machine
without it; in CI it must run.
"""

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness import run_gateway, write_models

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    path = REPO / ".cache" / "tiny-llama.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_gguf.py"), str(path)], check=True)
    return path


def llama_spec(name: str, model: Path, **fields: object) -> dict[str, object]:
    return {
        "name": name,
        "engine": "generic",
        "model": str(model),
        "command": [sys.executable, "-m", "llama_cpp.server", "--model", "{model}", "--model_alias",
                    "{served_name}", "--host", "{host}", "--port", "{port}", "--interrupt_requests", "false",
                    "--n_ctx", "512"],
        "start_timeout": "60s",
        "stop_timeout": "10s",
        "min_uptime": 0,
        **fields,
    }


async def test_real_engine_cold_start_warm_idle_stop_and_restart(tmp_path: Path, tiny_model: Path) -> None:
    models = write_models(tmp_path, llama_spec("tiny", tiny_model, aliases=["default"], idle_timeout="2s"))
    async with run_gateway(models, reap_interval=0.2) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="not-needed", max_retries=0, timeout=60)

        # cold: the first request starts the engine and gets a real answer
        reply = await sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=16)
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert gw.starts("tiny") == 1

        # warm, streaming, through an alias
        stream = await sdk.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=24, stream=True)
        chunks = [chunk async for chunk in stream]
        assert len(chunks) >= 2
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        text = await sdk.completions.create(model="tiny", prompt="once upon", max_tokens=8)
        assert text.choices[0].text is not None
        assert gw.starts("tiny") == 1

        # raw HTTP: the engine's SSE framing arrives untouched, [DONE] included
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                    "stream": True}
            resp = await client.post(gw.v1 + "/chat/completions", json=body)
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.text.rstrip().endswith("data: [DONE]")

        # idle: stopped after idle_timeout
        pid = gw.waker.controller("tiny").handle.pid
        await gw.waker.events.wait_for(lambda e: e.kind == "idle_stop", timeout=30)
        await gw.waker.events.wait_for(lambda e: e.target == "stopped", timeout=30)
        with pytest.raises(ProcessLookupError):
            import os
            os.kill(pid, 0)

        # the next request starts it again
        again = await sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "again"}], max_tokens=4, stream=True)
        assert [c async for c in again]
        assert gw.starts("tiny") == 2
