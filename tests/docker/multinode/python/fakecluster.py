"""What the fake `ray`, `vllm` and `sglang` share: a rendezvous over TCP, one JSON line per message.

A member connects to the coordinator (the Ray head, SGLang rank 0), says who it is, and stays connected:
the connection IS its membership, so a member (or coordinator) that dies is noticed at once by the other
side, as Ray's GCS heartbeat and NCCL's sockets notice it in the real engines, only faster.
"""

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable

FAKE_ENGINE = os.environ.get("SPARKGATE_FAKE_ENGINE", "/opt/tests/fake_engine.py")


def say(text: str) -> None:
    print(text, flush=True)


def fail(text: str, code: int = 1) -> None:
    print(text, file=sys.stderr, flush=True)
    sys.exit(code)


def on_sigterm(loop: asyncio.AbstractEventLoop, cleanup: Callable[[], None] = lambda: None) -> None:
    """PID 1 in a container ignores SIGTERM unless it handles it: `docker stop` must be prompt."""

    def stop() -> None:
        cleanup()
        os._exit(0)

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)


async def connect(host: str, port: int, hello: dict, timeout: float) -> tuple[asyncio.StreamReader,
                                                                               asyncio.StreamWriter]:
    """Connect to the coordinator, retrying until `timeout` (it may still be starting), and say hello."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
            break
        except (OSError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                fail(f"Failed to connect to {host}:{port} within {timeout:g}s: {exc or type(exc).__name__}")
            await asyncio.sleep(0.2)
    writer.write(json.dumps(hello).encode() + b"\n")
    await writer.drain()
    return reader, writer


def connect_timeout() -> float:
    return float(os.environ.get("SPARKGATE_FAKE_CONNECT_TIMEOUT", "10"))


async def serve_fake_engine(host: str, port: int, model: str, watch: asyncio.Future) -> None:
    """Run tests/fake_engine.py as the OpenAI server until it ends (its exit code is ours) or `watch`
    resolves with an error message (a lost peer: kill the server, exit 1)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, FAKE_ENGINE, "--host", host, "--port", str(port), "--model", model)
    on_sigterm(asyncio.get_running_loop(), child.terminate)
    ended = asyncio.ensure_future(child.wait())
    done, _ = await asyncio.wait({ended, watch}, return_when=asyncio.FIRST_COMPLETED)
    if watch in done:
        child.kill()
        fail(watch.result())
    sys.exit(ended.result())
