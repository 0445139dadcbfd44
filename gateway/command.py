"""The `sparkgate` command's entry point: what must happen before the gateway's modules load.

Importing them (aiohttp, the Docker SDK, pydantic, uvicorn, the waker) takes a second or more of CPU. `serve` catches
SIGHUP before that, so a reload sent as the gateway starts can't end it (gateway/service.py::Hangup), and `health`,
which a container's health check runs every 30 s, runs without them. Everything else is gateway/cli.py's.
"""

import sys

from gateway.service import Hangup, health_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["health"]:
        return health_main(argv[1:])
    hangup = None
    if argv[:1] == ["serve"]:
        hangup = Hangup()
        hangup.install()
    from gateway.cli import main as cli_main  # the slow imports

    return cli_main(argv, hangup)


if __name__ == "__main__":
    sys.exit(main())
