"""The deployment files and the gateway process (issue 17): the image's `docker run` example serves; its HEALTHCHECK
and the compose file's probe where the gateway listens (`sparkgate health`); systemd waits for the gateway to be
ready before it reloads it; the `sparkgate` command catches SIGHUP before the gateway's modules load."""

import asyncio
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.auth import is_loopback, load_keys
from gateway.settings import GatewaySettings
from tests.chaos.util import REPO, free_port
from tests.harness import fake_engine_spec, write_models

DOCKERFILE = (REPO / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    """The image's ENV defaults (one ENV instruction of NAME=VALUE pairs, continued over lines)."""
    joined = DOCKERFILE.replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def run_examples() -> list[list[str]]:
    """Each `docker run` command in the Dockerfile's comments, as words (continuation lines joined)."""
    comments = "\n".join(line.removeprefix("#").strip() for line in DOCKERFILE.splitlines() if line.startswith("#"))
    return [shlex.split(match) for match in re.findall(r"(docker run (?:[^\n]*\\\n)*[^\n]*)", comments)]


def options(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == flag]


def test_the_image_and_compose_probe_health_where_the_gateway_listens() -> None:
    [healthcheck] = re.findall(r"^HEALTHCHECK .*\\\n\s+CMD (.*)$", DOCKERFILE, re.M)
    assert yaml.safe_load(healthcheck) == ["sparkgate", "health"]
    compose = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
    assert compose["services"]["sparkgate"]["healthcheck"]["test"] == ["CMD", "sparkgate", "health"]
    assert "127.0.0.1" not in healthcheck


async def test_the_docker_run_example_serves(tmp_path: Path) -> None:
    # It exited at once: SPARKGATE_HOST=0.0.0.0 (the image's default) without keys is refused.
    [example] = run_examples()
    env = {**dockerfile_env(), **dict(e.split("=", 1) for e in options(example, "-e"))}
    models = write_models(tmp_path / "models.d", fake_engine_spec("m"))
    # The paths and port the container has, mapped here; everything else as the example gives it.
    env |= {"SPARKGATE_CONFIG_DIR": str(models), "SPARKGATE_STATS_DB": str(tmp_path / "stats.sqlite3"),
            "SPARKGATE_PORT": str(free_port()),
            "SPARKGATE_NODES": '{"local": {"total_gb": 16, "memory_probe": "none"}}'}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPARKGATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.command", "serve", cwd=REPO, env={**clean, **env},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(60):
            while line := (await proc.stdout.readline()).decode():
                said.append(line)
                if "Uvicorn running on" in line:
                    break
        assert said and "Uvicorn running on" in said[-1], "".join(said)
        health = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.command", "health", cwd=REPO,
                                                      env={**clean, **env})
        assert await health.wait() == 0
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    # Signals reach the gateway through an init (SIGHUP: reload); engines reach it on the host's loopback.
    assert "--init" in example and options(example, "--network") == ["host"]


def test_the_lan_variant_of_the_example_has_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # The line that replaces SPARKGATE_HOST=127.0.0.1 to serve the LAN: the image's 0.0.0.0, with keys.
    comments = [line.removeprefix("#").strip() for line in DOCKERFILE.splitlines() if line.startswith("#")]
    lan = next(shlex.split(line) for line in comments if "SPARKGATE_API_KEYS=" in line)
    for name in [name for name in os.environ if name.startswith("SPARKGATE_")]:
        monkeypatch.delenv(name)
    for name, value in {**dockerfile_env(), **dict(e.split("=", 1) for e in options(lan, "-e"))}.items():
        monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert not is_loopback(settings.host)
    # What `sparkgate serve` asks of a non-loopback address.
    assert load_keys(settings.api_keys, settings.api_keys_file) and settings.admin_key


def test_systemd_waits_for_the_gateway_before_it_reloads_it() -> None:
    text = (REPO / "deploy" / "sparkgate.service").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    keys = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("["))
    # READY=1 once it serves (gateway/service.py::Notifier): `systemctl restart && systemctl reload` can't reach it
    # before it catches SIGHUP.
    assert (keys["Type"], keys["NotifyAccess"]) == ("notify", "main")
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_sparkgate_command_catches_sighup_before_the_gateway_loads() -> None:
    # gateway/command.py installs the handler, then imports the gateway (seconds): gateway.cli:main did it only
    # after those imports.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["sparkgate"] == "gateway.command:main"
