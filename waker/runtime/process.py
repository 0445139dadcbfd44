"""Engines as local processes, each in its own process group."""

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from pathlib import Path

from waker.config.spec import ModelSpec
from waker.engines.base import Engine, Launch
from waker.runtime.base import Exit, free_port, http_url, run_to_end

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the gateway is killed outright (SIGKILL, OOM), its engines must not linger holding memory.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessHandle:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, keep_lines: int) -> None:
        self._proc = proc
        self._url = url
        self._lines: deque[str] = deque(maxlen=keep_lines)
        self._reader = asyncio.create_task(self._read_output())

    async def _read_output(self) -> None:
        # Drain continuously: an engine blocked on a full pipe would look hung.
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            self._lines.append(line.decode(errors="replace").rstrip("\r\n"))

    @property
    def ident(self) -> str:
        return f"pid {self._proc.pid}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def process_group(self) -> int:
        """The engine's process group (started in a new session: its pid); its workers inherit it."""
        return self._proc.pid

    @property
    def root_url(self) -> str:
        return self._url

    @property
    def api_base(self) -> str:
        return self._url + "/v1"

    @property
    def exit_code(self) -> int | None:
        return self._proc.returncode

    async def wait_exit(self) -> Exit:
        code = await self._proc.wait()
        # The last lines (often the reason it exited) arrive just after the exit.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=1.0)
        return Exit(code)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, grace: float) -> int | None:
        try:
            if self._proc.returncode is None:
                self._signal_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self._proc.wait(), timeout=grace)
                except TimeoutError:
                    self._signal_group(signal.SIGKILL)
                    await self._proc.wait()
        except asyncio.CancelledError:
            # Whoever stops it gave up waiting (a second stop, a shutdown): the engine must end all the same,
            # or one that ignores SIGTERM outlives its model (tests/unit/runtime/test_process.py).
            self._signal_group(signal.SIGKILL)
            await run_to_end(self._proc.wait())
            raise
        finally:
            # Children the engine spawned (workers) must not outlive it.
            self._signal_group(signal.SIGKILL)
            self._reader.cancel()
        return self._proc.returncode

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        return tuple(self._lines)[-lines:] if lines > 0 else ()


class ProcessRuntime:
    """Starts `engine.argv(...)` as a subprocess; stdout and stderr are kept as the log."""

    detached = False  # engines are our children: they stop with the gateway

    def __init__(self, keep_log_lines: int = 200) -> None:
        self._keep = keep_log_lines

    async def start(self, spec: ModelSpec, engine: Engine) -> ProcessHandle:
        port = spec.port or free_port(spec.host if spec.host not in ("0.0.0.0", "::") else "127.0.0.1")
        argv = engine.argv(spec, Launch(host=spec.host, port=port))
        env = {**os.environ, **spec.env}
        # Engines installed beside the gateway (same virtualenv) are found without activating it.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=self._workdir(spec),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return ProcessHandle(proc, http_url(spec.host, port), self._keep)

    @staticmethod
    def _workdir(spec: ModelSpec) -> str | None:
        if spec.workdir is None:
            return None
        path = Path(spec.workdir).expanduser()
        if not path.is_absolute() and spec.source is not None:
            path = spec.source.parent / path  # relative to the models.d file that names it
        return str(path)
