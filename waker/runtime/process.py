"""Engines as local processes, each in its own process group, in an environment scrubbed of the gateway's secrets."""

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from waker.config.spec import ModelSpec
from waker.engines.base import Engine, Launch
from waker.runtime.base import Exit, free_port, http_url, run_to_end

log = logging.getLogger("sparkgate.runtime")

# What an engine never inherits from the gateway's environment (a model's own `env` may still set any of it): the
# gateway's settings and keys (SPARKGATE_*), whatever is named like a credential, and the gateway's ways into other
# machines (its cloud, Docker daemons, SSH agent). A failed start's log tail goes back to the client: an engine
# that prints its environment must not print a key (tests/integration/test_engine_isolation.py).
_WITHHELD_PREFIXES = ("SPARKGATE_", "AWS_", "AZURE_", "DOCKER_", "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO",
                      "KUBECONFIG")
_SECRET_WORDS = frozenset({"KEY", "KEYS", "APIKEY", "TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWD",
                           "PASSPHRASE", "CREDENTIAL", "CREDENTIALS", "AUTH", "PAT", "PWD", "COOKIE", "COOKIES"})
_SECRET_PARTS = ("PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "APIKEY", "PRIVATE_KEY")
# Hugging Face's token is the engine's own business: it downloads gated models with it, and the engine could read
# it from ~/.cache/huggingface/token anyway (HOME is kept). It is the machine owner's token, not the gateway's.
_KEPT_SECRETS = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"})


def withheld(name: str) -> bool:
    """Whether an engine is kept from seeing the gateway's variable `name` (see _WITHHELD_PREFIXES)."""
    upper = name.upper()
    if upper in _KEPT_SECRETS:
        return False
    if upper.startswith(_WITHHELD_PREFIXES):
        return True
    words = upper.split("_")
    # A lone PWD is the working directory, not a password (MYSQL_PWD is one).
    if "PWD" in words and len(words) == 1:
        return False
    return bool(_SECRET_WORDS.intersection(words)) or any(part in upper for part in _SECRET_PARTS)


def engine_environment(spec_env: Mapping[str, str], parent: Mapping[str, str]) -> dict[str, str]:
    """The environment of an engine: `parent` (the gateway's) without what it must not see, then `spec_env` (the
    model's `env`, which wins and may set anything: it is written for this engine). What engines need to run is
    kept: PATH, HOME, LANG and LC_*, TMPDIR, CUDA_* and NVIDIA_* device selection, HF_* (HF_TOKEN too: see
    _KEPT_SECRETS), VLLM_*, proxies and the like. Anything else secret an engine needs goes in its `env`."""
    env = {name: value for name, value in parent.items() if not withheld(name)}
    env.update(spec_env)
    return env


# How engines say they could not bind their port (uvicorn and aiohttp: "[Errno 98] ... address already in use";
# llama.cpp: "couldn't bind HTTP server socket").
_BIND_FAILED = re.compile(r"address already in use|EADDRINUSE|errno 98\b|could(?: not|n't) bind|failed to bind",
                          re.IGNORECASE)
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp*


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on `port` on this machine, any address (from /proc/net/tcp and tcp6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def _group_holds(pgid: int, inodes: set[str]) -> bool:
    """Whether a process of group `pgid` holds one of the sockets `inodes`."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in wanted:
                        return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _port_holder(pgid: int, port: int) -> bool | None:
    """Who listens on `port`: True the engine of group `pgid`, False someone else, None nobody."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    return _group_holds(pgid, inodes)


# An engine is started through this program (`python -I -S -c _DIE_WITH_PARENT <gateway pid> <argv...>`), which asks
# Linux to SIGKILL it when the gateway dies (prctl PR_SET_PDEATHSIG, kept across the exec that follows) and then
# becomes the engine (same pid, so the same process group). If the gateway is killed outright (SIGKILL, OOM), its
# engines must not linger holding memory. A gateway that died before the prctl is noticed (the parent changed) and the
# engine is not started at all. It used to be a preexec_fn: Python code (ctypes) run between fork and exec in a child
# of a process with threads (the loop's executor, the Docker SDK's, the stats sampler), which is not fork-safe: a lock
# another thread held at the fork (the loader's, the allocator's) stays held in the child, which hangs before its
# exec. A program of its own starts from exec, with one thread. `-I -S`: none of the engine's PYTHON* variables and
# no site-packages reach it, only the standard library. Python ignores SIGPIPE and SIGXFSZ for itself; the engine
# gets them back at their defaults, as subprocess gives them (restore_signals). Guarded by
# tests/unit/runtime/test_process_spawn.py.
_DIE_WITH_PARENT = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
for name in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"sparkgate: could not run {sys.argv[2]}: {exc.strerror}", file=sys.stderr, flush=True)
    os._exit(127)
"""


def _with_parent(argv: list[str], environ: Mapping[str, str], cwd: str | None) -> list[str]:
    """`argv` run through _DIE_WITH_PARENT. A command that can't be found raises FileNotFoundError here, as a direct
    spawn did (the model's start fails with "could not be launched: [Errno 2] No such file or directory: 'vllm'")."""
    command = argv[0]
    where = os.path.join(cwd, command) if cwd and os.sep in command else command
    if shutil.which(where, path=environ.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class ProcessHandle:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, keep_lines: int,
                 argv: tuple[str, ...] = ()) -> None:
        self._proc = proc
        self._url = url
        self.argv = argv  # the command line it was started with
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
    """Starts `engine.argv(...)` as a subprocess; stdout and stderr are kept as the log.

    An engine is given a free port when its entry names none; that is check-then-use: something may take the port
    between the pick and the engine's bind. `start` then waits, at most `bind_window` seconds, until the engine
    listens there or exits; an engine that exits because it could not bind (it says the address is in use, or
    someone else listens on its port now) is started again on a newly picked port, `bind_attempts` times in all.
    Engines that bind later than that (SGLang binds after loading the weights) fail as before and the next request
    starts them on a new port. `pick_port` is injectable for tests (tests/unit/runtime/test_process_env.py)."""

    detached = False  # engines are our children: they stop with the gateway

    def __init__(self, keep_log_lines: int = 200, *, pick_port: Callable[[str], int] | None = None,
                 bind_window: float = 3.0, bind_attempts: int = 3, environ: Mapping[str, str] | None = None,
                 poll_interval: float = 0.05) -> None:
        self._keep = keep_log_lines
        self._pick_port = pick_port  # None: free_port
        self._bind_window = bind_window
        self._bind_attempts = max(1, bind_attempts)
        self._environ = environ  # None: the gateway's own, read at each start
        self._poll = poll_interval

    async def start(self, spec: ModelSpec, engine: Engine) -> ProcessHandle:
        if spec.port is not None:
            return await self._launch(spec, engine, spec.port)  # the user's port: nothing to pick again
        pick_on = spec.host if spec.host not in ("0.0.0.0", "::") else "127.0.0.1"
        for attempt in range(1, self._bind_attempts + 1):
            port = (self._pick_port or free_port)(pick_on)
            handle = await self._launch(spec, engine, port)
            try:
                lost = attempt < self._bind_attempts and await self._lost_port(handle, port)
            except asyncio.CancelledError:
                # Cancel-safe (runtime/base.py): the engine this start launched ends before the cancellation goes on.
                await run_to_end(handle.stop(0))
                raise
            if not lost:
                return handle
            await run_to_end(handle.stop(0))  # its workers, if any, go with it
            log.warning("%s could not bind port %d (taken since it was picked); starting it again on another port "
                        "(attempt %d of %d)", spec.name, port, attempt + 1, self._bind_attempts)
        raise AssertionError("unreachable: the last attempt returns its handle")

    async def _lost_port(self, handle: "ProcessHandle", port: int) -> bool:
        """Whether the engine exited for want of its port: waits until it listens there, exits, or `bind_window`
        passes (then it is left to its start, as any engine)."""
        if str(port) not in " ".join(handle.argv):
            return False  # a command that does not use {port}: it binds something else, or nothing
        exited = asyncio.ensure_future(handle.wait_exit())
        try:
            async with asyncio.timeout(self._bind_window):
                while not exited.done():
                    if await asyncio.to_thread(_port_holder, handle.process_group, port):
                        return False  # it listens: the port is its own
                    await asyncio.wait({exited}, timeout=self._poll)
        except TimeoutError:
            return False
        finally:
            exited.cancel()
        said = any(_BIND_FAILED.search(line) for line in await handle.log_tail(self._keep))
        return said or await asyncio.to_thread(_port_holder, handle.process_group, port) is False

    async def _launch(self, spec: ModelSpec, engine: Engine, port: int) -> ProcessHandle:
        argv = engine.argv(spec, Launch(host=spec.host, port=port))
        env = engine_environment(spec.env, os.environ if self._environ is None else self._environ)
        # Engines installed beside the gateway (same virtualenv) are found without activating it.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        cwd = self._workdir(spec)
        proc = await asyncio.create_subprocess_exec(
            *_with_parent(argv, env, cwd),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group (the pid stays the engine's through the exec)
        )
        return ProcessHandle(proc, http_url(spec.host, port), self._keep, tuple(argv))

    @staticmethod
    def _workdir(spec: ModelSpec) -> str | None:
        if spec.workdir is None:
            return None
        path = Path(spec.workdir).expanduser()
        if not path.is_absolute() and spec.source is not None:
            path = spec.source.parent / path  # relative to the models.d file that names it
        return str(path)
