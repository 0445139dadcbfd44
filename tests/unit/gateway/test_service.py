"""gateway/service.py (issue 17): the address a health check probes, read as the gateway reads its settings; SIGHUP
in each phase of a gateway's life; what systemd is told."""

import asyncio
import contextlib
import http.server
import logging
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.service import Hangup, Notifier, health_main, health_target, health_url, probe_address
from gateway.settings import GatewaySettings


@pytest.mark.parametrize(("host", "probed"), [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("192.168.1.20", "192.168.1.20"),
    ("::", "::1"), ("[::]", "::1"), ("::1", "::1"), ("fd00::5", "fd00::5"), ("127.0.0.2", "127.0.0.2"),
    ("localhost", "localhost"), ("spark.lan", "spark.lan"),
])
def test_a_health_check_probes_the_address_the_gateway_listens_on(host: str, probed: str) -> None:
    # Always 127.0.0.1 before: a gateway bound to one LAN address was unhealthy for good.
    assert probe_address(host) == probed


def test_the_health_url_brackets_an_ipv6_address() -> None:
    assert health_url("0.0.0.0", 8009) == "http://127.0.0.1:8009/health"
    assert health_url("::", 9000) == "http://[::1]:9000/health"
    assert health_url("10.1.2.3", 80) == "http://10.1.2.3:80/health"


@pytest.mark.parametrize("environ", [
    {}, {"SPARKGATE_HOST": "10.0.0.5", "SPARKGATE_PORT": "9000"}, {"sparkgate_host": "::", "Sparkgate_Port": "1"},
    {"SPARKGATE_PORT": "8010", "OTHER": "x"},
], ids=["defaults", "both", "any case", "port only"])
def test_health_reads_host_and_port_as_the_gateway_reads_them(monkeypatch: pytest.MonkeyPatch,
                                                              environ: dict[str, str]) -> None:
    monkeypatch.delenv("SPARKGATE_HOST", raising=False)
    monkeypatch.delenv("SPARKGATE_PORT", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert health_target(environ) == (settings.host, settings.port)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def health_server(host: str) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((host, 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_health_succeeds_for_a_gateway_on_one_address_and_fails_where_nothing_answers(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # 127.0.0.2 is loopback too, but nothing answers on 127.0.0.1 at that port: what the old check probed.
    with health_server("127.0.0.2") as port:
        assert health_main([], {"SPARKGATE_HOST": "127.0.0.2", "SPARKGATE_PORT": str(port)}) == 0
        assert health_main(["--host", "127.0.0.1"], {"SPARKGATE_HOST": "127.0.0.2", "SPARKGATE_PORT": str(port)}) == 1
        assert f"unhealthy: http://127.0.0.1:{port}/health" in capsys.readouterr().err
    # A proxy in the environment is not used for the gateway on this machine (nothing listens on port 9).
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with health_server("0.0.0.0") as port:
        assert health_main([], {"SPARKGATE_HOST": "0.0.0.0", "SPARKGATE_PORT": str(port)}) == 0
    assert health_main(["--timeout", "2"], {"SPARKGATE_PORT": "not-a-port"}) == 1
    assert "SPARKGATE_PORT is not a port number" in capsys.readouterr().err


# -- SIGHUP ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def hangup() -> Iterator[Hangup]:
    before = signal.getsignal(signal.SIGHUP)
    caught = Hangup()
    assert caught.install()
    try:
        yield caught
    finally:
        caught.restore()
        assert signal.getsignal(signal.SIGHUP) == before


async def test_a_sighup_while_starting_is_kept_and_reloads_once_when_ready(hangup: Hangup) -> None:
    reloads: list[int] = []
    signal.raise_signal(signal.SIGHUP)  # it used to end the process (SIG_DFL) until the app's startup was done
    signal.raise_signal(signal.SIGHUP)
    assert reloads == []
    hangup.ready(asyncio.get_running_loop(), lambda: reloads.append(1))
    assert reloads == [1]  # once for both
    signal.raise_signal(signal.SIGHUP)
    await asyncio.sleep(0)  # the reload is handed to the loop
    assert reloads == [1, 1]


async def test_a_sighup_while_stopping_is_ignored_and_said(hangup: Hangup, caplog: pytest.LogCaptureFixture) -> None:
    reloads: list[int] = []
    hangup.ready(asyncio.get_running_loop(), lambda: reloads.append(1))
    hangup.stopping()
    with caplog.at_level(logging.INFO, "sparkgate.gateway"):
        signal.raise_signal(signal.SIGHUP)
        await asyncio.sleep(0)
    assert reloads == []
    assert "SIGHUP ignored: the gateway is shutting down" in caplog.text


def test_a_hangup_is_installed_once() -> None:
    first, second = Hangup(), Hangup()
    try:
        assert first.install() and not first.install()
        assert second.install()  # another gateway's, in the same process (tests): it takes over, then gives back
        second.restore()
        assert signal.getsignal(signal.SIGHUP) == first._received
    finally:
        first.restore()


# -- systemd --------------------------------------------------------------------------------------------------------

def test_systemd_is_told_through_its_socket_and_engines_never_see_it(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        environ = {"NOTIFY_SOCKET": str(path), "PATH": "/bin"}
        notifier = Notifier.from_environ(environ)
        assert environ == {"PATH": "/bin"}  # taken out: engines inherit the gateway's environment
        notifier.notify("READY=1")
        assert listener.recv(100) == b"READY=1"
    abstract = f"sparkgate-test-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + abstract)
        Notifier.from_environ({"NOTIFY_SOCKET": "@" + abstract}).notify("STOPPING=1")
        assert listener.recv(100) == b"STOPPING=1"


def test_without_systemd_or_with_its_socket_gone_nothing_fails(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    Notifier.from_environ({}).notify("READY=1")
    Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")}).notify("READY=1")
    assert "could not tell systemd 'READY=1'" in caplog.text


def test_the_sparkgate_command_loads_nothing_slow_before_it_catches_sighup() -> None:
    # gateway/command.py: SIGHUP is caught, and `health` runs, before the gateway's modules load (seconds of imports).
    heavy = ("aiohttp", "docker", "fastapi", "pydantic", "uvicorn", "waker", "stats", "yaml", "asyncio")
    script = f"import sys, gateway.command; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
