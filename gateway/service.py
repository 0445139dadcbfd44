"""What a `sparkgate serve` process owes whoever runs it (systemd, Docker, a shell): SIGHUP handled at every point of
its life, readiness told to systemd, and a health check that probes the address the gateway really listens on."""

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

# This module is imported first of all by `sparkgate` (gateway/command.py): it imports little, so SIGHUP is caught
# within a few tens of milliseconds of the process's start.
if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("sparkgate.gateway")


class Hangup:
    """SIGHUP (re-read models.d) for the whole life of a gateway process.

    SIGHUP's default action ends a process, and a gateway gets one whenever its supervisor reloads it: `systemctl
    restart && systemctl reload`, `docker compose kill -s SIGHUP` just after `up`, or during a stop. It used to be
    caught only while the app ran (from the end of its startup to the start of its shutdown): a SIGHUP before killed
    the gateway as it started, one after killed it before it had stopped its engines. `sparkgate serve` now installs
    this handler first, before the gateway's modules load (gateway/command.py), and keeps it until the process exits;
    in each phase:

    - starting (until the app's lifespan has started the waker): the signal is remembered, and models.d is re-read
      once, as soon as the gateway is ready. Remembered rather than ignored: the operator asked for the files as they
      are now, and a file changed after this process read models.d would otherwise be missed; a re-read that finds
      nothing changed costs nothing (unchanged models keep their engines).
    - ready: models.d is re-read (the handler hands the reload to the event loop and returns).
    - stopping (from the start of the server's shutdown): ignored, with a log line. Every model is about to stop;
      a reload would only race the shutdown.

    Guarded by tests/chaos/test_gateway_signals.py (a real `sparkgate serve` process). Python can't act before its
    interpreter has started: a SIGHUP in those first milliseconds still ends the process. systemd, whose
    `restart && reload` is the usual way to get one then, waits for the gateway's readiness (`Type=notify`,
    deploy/sparkgate.service; `notify`) before it reloads.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload: Callable[[], None] | None = None
        self._pending = False
        self._stopping = False
        self._installed = False
        self._previous: Any = None

    def install(self) -> bool:
        """Catch SIGHUP from now on. False if it was done already, or can't be (no SIGHUP, not the main thread)."""
        if self._installed:
            return False
        try:
            self._previous = signal.signal(signal.SIGHUP, self._received)
        except (AttributeError, ValueError):
            return False
        self._installed = True
        return True

    def restore(self) -> None:
        """Give SIGHUP back to whoever had it before `install` (an app run inside another program: its tests)."""
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def ready(self, loop: "asyncio.AbstractEventLoop", reload: Callable[[], None]) -> None:
        """The gateway runs: each SIGHUP calls `reload` in `loop` from now on, and one that came before, now."""
        self._loop, self._reload = loop, reload
        if self._pending and not self._stopping:
            self._pending = False
            log.info("SIGHUP came while the gateway was starting: re-reading models.d now")
            reload()

    def stopping(self) -> None:
        """The gateway shuts down: SIGHUP is ignored from now on."""
        self._stopping = True
        self._reload = None

    def _received(self, signum: int, frame: object) -> None:
        # Python runs this in the main thread between two bytecodes: it only records the signal or hands the work on.
        if self._stopping:
            log.info("SIGHUP ignored: the gateway is shutting down")
        elif self._reload is None or self._loop is None:
            self._pending = True
        else:
            self._loop.call_soon_threadsafe(self._reload)


class Notifier:
    """Tells systemd how the gateway is doing (sd_notify: `READY=1` once it serves, `STOPPING=1` when it begins to
    stop), when it runs under `Type=notify`; does nothing elsewhere. With it, `systemctl start` and `restart` return
    once the gateway answers, and a `systemctl reload` right after them waits for that too."""

    def __init__(self, address: str | None) -> None:
        self._address = address

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> "Notifier":
        """The notifier systemd asked for, if any; NOTIFY_SOCKET is taken out of `environ`, so that no engine the
        gateway starts inherits it (as sd_notify's unset_environment does)."""
        return cls(environ.pop("NOTIFY_SOCKET", None) or None)

    def notify(self, state: str) -> None:
        if self._address is None:
            return
        # An abstract socket is written "@name" in the variable.
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(address)
                sock.sendall(state.encode())
        except OSError as exc:  # systemd gone or the socket misconfigured: the gateway serves all the same
            log.warning("could not tell systemd %r at %s: %s", state, self._address, exc)


def probe_address(host: str) -> str:
    """The address a health check on the gateway's machine reaches a gateway that listens on `host` at: `host`
    itself, unless it is a wildcard (0.0.0.0, ::, empty), which loopback of its family reaches."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if not bare:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return bare  # a name (localhost, spark.lan): it resolves to what the gateway bound
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return bare


def health_url(host: str, port: int) -> str:
    """The URL of /health on a gateway that listens on `host`:`port` (see `probe_address`)."""
    address = probe_address(host)
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}/health"


def check_health(url: str, timeout: float) -> str | None:
    """None if the gateway at `url` answers 200, else what went wrong (for a container's health log)."""
    import urllib.error
    import urllib.request

    # No proxy, whatever the environment says: the gateway is on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {getattr(exc, 'reason', None) or exc}"


def health_target(environ: Mapping[str, str]) -> tuple[str, int]:
    """Where the gateway of `environ` listens: SPARKGATE_HOST and SPARKGATE_PORT, read as GatewaySettings reads them
    (the names in any case; the same defaults), without loading it (see `health_main`)."""
    env = {name.upper(): value for name, value in environ.items()}
    return env.get("SPARKGATE_HOST", "127.0.0.1"), int(env.get("SPARKGATE_PORT", "8009"))


def health_main(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    """`sparkgate health`: 0 if the gateway answers /health where it listens, 1 if not (what went wrong on stderr,
    which Docker keeps in the container's health log). The image's HEALTHCHECK and the compose file's healthcheck
    run it; they used to probe 127.0.0.1 whatever SPARKGATE_HOST said, so a gateway bound to one LAN address was
    unhealthy for good.

    The address comes from the environment as the gateway reads it (`health_target`), not through GatewaySettings:
    loading the gateway's modules costs a second or more of CPU, on every probe (tests/unit/gateway/test_service.py
    compares the two readings)."""
    parser = argparse.ArgumentParser(prog="sparkgate health", description=health_main.__doc__.split("\n")[0])
    parser.add_argument("--host", help="the address the gateway listens on (default: SPARKGATE_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="its port (default: SPARKGATE_PORT, 8009)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for its answer")
    args = parser.parse_args(argv)
    try:
        host, port = health_target(os.environ if environ is None else environ)
    except ValueError as exc:
        print(f"sparkgate: SPARKGATE_PORT is not a port number: {exc}", file=sys.stderr)
        return 1
    url = health_url(host if args.host is None else args.host, port if args.port is None else args.port)
    problem = check_health(url, args.timeout)
    if problem is not None:
        print(f"sparkgate: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Hangup", "Notifier", "check_health", "health_main", "health_target", "health_url", "probe_address"]
