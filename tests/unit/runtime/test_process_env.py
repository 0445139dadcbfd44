"""What an engine gets from the gateway: an environment without the gateway's keys (process engines; containers get
only their spec's `env`), and a port that is its own (a port picked free but taken before the engine bound it is
picked again)."""

import asyncio
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.runtime.test_process import group_alive, until_printed
from waker.config.spec import ModelSpec
from waker.engines.registry import engine_for
from waker.runtime import process
from waker.runtime.base import free_port
from waker.runtime.docker.container import container_config
from waker.runtime.docker.host import DockerNode
from waker.runtime.process import ProcessHandle, ProcessRuntime

SECRETS = {
    "SPARKGATE_API_KEYS": '[{"key": "sk-client-secret", "name": "laptop"}]',
    "SPARKGATE_ADMIN_KEY": "sk-admin-secret",
    "OPENAI_API_KEY": "sk-openai-secret",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_PROFILE": "prod",
    "GITHUB_TOKEN": "ghp-secret",
    "PGPASSWORD": "pg-secret",
    "DB_PASSWORD": "db-secret",
    "DOCKER_HOST": "ssh://root@spark2",
}
NEEDED = {
    "HOME": "/home/spark",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "CUDA_VISIBLE_DEVICES": "0",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "HF_HOME": "/models/hf",
    "HF_HUB_OFFLINE": "1",
    "HF_TOKEN": "hf-gated-downloads",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_USE_V1": "1",
    "PWD": "/srv",
}

# Writes its environment as JSON to argv[1], prints it, exits 1: a failed start whose log tail would carry it.
PRINTS_ENV = ("import json, os, sys\n"
              "open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))\n"
              "print('\\n'.join(f'{k}={v}' for k, v in sorted(os.environ.items())), flush=True)\n"
              "sys.exit(1)\n")

# Binds the port it is given and serves nothing; a taken port makes it exit with Python's "[Errno 98] Address
# already in use" traceback, as uvicorn, aiohttp and vLLM do.
BINDS = ("import socket, sys, time\n"
         "s = socket.socket()\n"
         "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
         "s.listen()\n"
         "print('listening', flush=True)\n"
         "time.sleep(60)\n")

# The same without a word: a taken port is only seen in that someone else listens there when it exits.
BINDS_SILENTLY = ("import socket, sys, time\n"
                  "s = socket.socket()\n"
                  "try:\n"
                  "    s.bind(('127.0.0.1', int(sys.argv[1])))\n"
                  "except OSError:\n"
                  "    sys.exit(3)\n"
                  "s.listen()\n"
                  "time.sleep(60)\n")


def generic(name: str, script: str, *args: str, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "engine": "generic",
                                     "command": [sys.executable, "-c", script, *args], **fields})


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def picker(monkeypatch: pytest.MonkeyPatch, *first: int) -> list[int]:
    """Makes the process runtime's port picker give `first`, then free ports; returns every port it gave."""
    given: list[int] = []

    def pick(host: str = "127.0.0.1") -> int:
        port = first[len(given)] if len(given) < len(first) else free_port(host)
        given.append(port)
        return port

    monkeypatch.setattr(process, "free_port", pick)
    return given


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def test_the_environment_keeps_what_engines_need_and_drops_every_secret() -> None:
    from waker.runtime.process import engine_environment  # here: the rest of the file runs against older code too

    env = engine_environment({"MY_API_KEY": "given-by-the-model"}, {**SECRETS, **NEEDED, "PATH": "/usr/bin"})
    assert not set(SECRETS) & set(env)
    assert {k: env[k] for k in NEEDED} == NEEDED
    assert env["MY_API_KEY"] == "given-by-the-model"  # the model's own env is explicit: it may set anything


async def test_a_process_engine_sees_none_of_the_gateways_keys_even_in_its_log_tail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SECRETS, **NEEDED}.items():
        monkeypatch.setenv(name, value)
    seen = tmp_path / "env.json"
    spec = generic("env", PRINTS_ENV, str(seen), env={"ENGINE_FLAVOUR": "test", "GITHUB_TOKEN": "the-models-own"})
    handle = await ProcessRuntime().start(spec, engine_for("generic"))
    assert (await handle.wait_exit()).code == 1
    env = json.loads(seen.read_text())
    tail = "\n".join(await handle.log_tail(1000))
    for name, value in SECRETS.items():
        assert value not in tail and value not in env.values(), name
    assert not [name for name in env if name.startswith("SPARKGATE_")]
    assert {k: env[k] for k in NEEDED} == NEEDED
    assert env["ENGINE_FLAVOUR"] == "test" and env["GITHUB_TOKEN"] == "the-models-own"
    assert env["PATH"].startswith(str(Path(sys.executable).parent))


def test_a_container_gets_only_its_specs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    spec = ModelSpec(name="c", engine="vllm", runtime="docker", image="vllm/vllm-openai", model="org/c",
                     env={"HF_TOKEN": "hf-given"})
    config = container_config(spec, engine_for("vllm"), DockerNode(), 41000, "h")
    assert config["environment"] == {"HF_TOKEN": "hf-given"}


async def test_a_port_taken_between_the_pick_and_the_bind_is_picked_again(
        monkeypatch: pytest.MonkeyPatch, taken: int) -> None:
    given = picker(monkeypatch, taken)
    handle = await ProcessRuntime().start(generic("m", BINDS, "{port}"), engine_for("generic"))
    try:
        assert given[0] == taken and len(given) == 2
        assert handle.root_url == f"http://127.0.0.1:{given[1]}"
        await until_printed(handle, "listening")
        assert handle.exit_code is None
    finally:
        await handle.stop(0)


async def test_an_engine_that_exits_silently_while_another_holds_its_port_is_started_again(
        monkeypatch: pytest.MonkeyPatch, taken: int) -> None:
    given = picker(monkeypatch, taken, taken)
    handle = await ProcessRuntime().start(generic("m", BINDS_SILENTLY, "{port}"), engine_for("generic"))
    try:
        assert given[:2] == [taken, taken] and len(given) == 3
        assert handle.root_url.endswith(f":{given[2]}") and handle.exit_code is None
    finally:
        await handle.stop(0)


async def test_an_engine_that_fails_for_another_reason_is_not_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    given = picker(monkeypatch)
    spec = generic("bad", "import sys; print('unknown flag --nope', flush=True); sys.exit(2)", "{port}")
    handle = await ProcessRuntime().start(spec, engine_for("generic"))
    assert (await handle.wait_exit()).code == 2
    assert len(given) == 1


async def test_a_port_the_model_names_is_never_replaced(monkeypatch: pytest.MonkeyPatch, taken: int) -> None:
    given = picker(monkeypatch)
    handle = await ProcessRuntime().start(generic("fixed", BINDS, "{port}", port=taken), engine_for("generic"))
    assert (await handle.wait_exit()).code == 1  # its bind failed: the user's port, reported as it is
    assert given == [] and handle.root_url.endswith(f":{taken}")


async def test_a_start_cancelled_while_it_waits_for_the_bind_leaves_no_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    picker(monkeypatch)
    pid_file = tmp_path / "pid"
    never_binds = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    spec = generic("slow", never_binds, str(pid_file), "{port}")
    starting = asyncio.ensure_future(ProcessRuntime(bind_window=60).start(spec, engine_for("generic")))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "", "the engine runs")
    pid = int(pid_file.read_text())
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert not group_alive(pid)


async def test_an_engine_that_listens_is_returned_without_waiting_out_the_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    picker(monkeypatch)
    began = time.monotonic()
    handle: ProcessHandle = await ProcessRuntime(bind_window=60).start(generic("m", BINDS, "{port}"),
                                                                        engine_for("generic"))
    try:
        assert time.monotonic() - began < 30 and handle.exit_code is None
    finally:
        await handle.stop(0)
