"""How an engine process is spawned (issue 17): through a program of its own that sets the parent-death signal and
then becomes the engine (fork-safe: no Python runs between fork and exec in the gateway's child), with the same pid
and process group, default signal dispositions, and the same error as before for a command that isn't there.
That the engine dies with a gateway killed outright: tests/chaos/test_gateway_signals.py."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.unit.runtime.test_process import until_printed
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime import process
from waker.runtime.process import ProcessRuntime

# Prints its pid and its process group, then waits to be stopped.
REPORTS = "import os, time\nprint(os.getpid(), os.getpgid(0), flush=True)\nprint('up', flush=True)\ntime.sleep(60)\n"


def spec(*command: str, **fields: Any) -> ModelSpec:
    return ModelSpec(name="e", command=list(command), **fields)


async def test_an_engine_is_spawned_without_a_preexec_fn_and_keeps_its_pid_and_group(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[dict[str, Any]] = []
    spawn = asyncio.create_subprocess_exec

    async def recording(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        spawned.append(kwargs)
        return await spawn(*argv, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording)
    handle = await ProcessRuntime().start(spec(sys.executable, "-c", REPORTS), engine_for("generic"))
    try:
        await until_printed(handle, "up")
        [kwargs] = spawned
        assert kwargs.get("preexec_fn") is None  # Python between fork and exec, in a process with threads: unsafe
        assert kwargs["start_new_session"] is True
        pid, group = (int(word) for word in (await handle.log_tail(2))[0].split())
        assert (pid, group) == (handle.pid, handle.process_group)  # the wrapper became the engine
    finally:
        await handle.stop(5)


async def test_an_engine_gets_the_default_signal_dispositions() -> None:
    # Python ignores SIGPIPE and SIGXFSZ for itself, and an ignored signal stays ignored across exec: the wrapper
    # gives them back, as subprocess does for a direct spawn. (cat is the engine: a Python engine would ignore them.)
    handle = await ProcessRuntime().start(spec("cat", "/proc/self/status"), engine_for("generic"))
    assert (await handle.wait_exit()).code == 0
    [ignored] = [int(line.split(":")[1], 16) for line in await handle.log_tail(100) if line.startswith("SigIgn:")]
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), sig.name


async def test_engines_start_while_other_threads_load_libraries_and_log() -> None:
    stop = threading.Event()

    def busy() -> None:  # what a gateway's threads do (the Docker SDK, the stats sampler, to_thread): dlopen, log
        import ctypes
        import logging

        while not stop.is_set():
            ctypes.CDLL(None)
            logging.getLogger("test.busy").debug("busy")

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    runtime = ProcessRuntime()
    try:
        async with asyncio.timeout(60):
            handles = await asyncio.gather(*(runtime.start(spec(sys.executable, "-c", REPORTS), engine_for("generic"))
                                             for _ in range(10)))
            for handle in handles:
                await until_printed(handle, "up")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    for handle in handles:
        await handle.stop(5)


async def test_a_command_that_is_not_there_fails_the_launch_as_before(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"\[Errno 2\] No such file or directory: 'no-such-engine-17'"):
        await ProcessRuntime().start(spec("no-such-engine-17", "--port", "{port}"), engine_for("generic"))
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '\./run\.sh'"):
        await ProcessRuntime().start(spec("./run.sh", workdir=str(tmp_path)), engine_for("generic"))
    # A relative command is found in the model's workdir, as a direct spawn found it.
    script = tmp_path / "run.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"print('up', flush=True); import time; time.sleep(60)\"\n")
    script.chmod(0o755)
    handle = await ProcessRuntime().start(spec("./run.sh", workdir=str(tmp_path)), engine_for("generic"))
    try:
        await until_printed(handle, "up")
    finally:
        await handle.stop(5)


def test_an_engine_whose_gateway_died_before_it_could_ask_to_die_with_it_never_starts(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    not_my_parent = str(os.getpid() + 1_000_000)  # the parent the wrapper will see is this test process
    wrapper = process._with_parent(["touch", str(marker)], os.environ, None)
    assert wrapper[-2:] == ["touch", str(marker)]
    wrapper[wrapper.index(str(os.getpid()))] = not_my_parent
    done = subprocess.run(wrapper, capture_output=True, timeout=30, check=False)
    assert done.returncode == 1 and not marker.exists()
    wrapper[wrapper.index(not_my_parent)] = str(os.getpid())
    assert subprocess.run(wrapper, capture_output=True, timeout=30, check=False).returncode == 0
    assert marker.exists()
