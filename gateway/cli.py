"""`sparkgate`: serve, check, and the operator commands (status, warm, start, stop, logs, reload, stats)."""

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from gateway.auth import AuthError, is_loopback, load_keys
from gateway.config import Loaded, load
from gateway.settings import GatewaySettings
from waker import compose
from waker.config.durations import format_duration
from waker.config.machine import describe_unified
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError, Registry
from waker.scheduling.placement import budget_problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stats"]:
        from stats.cli import stats_command

        return stats_command(argv[1:], GatewaySettings().stats_db)
    parser = argparse.ArgumentParser(prog="sparkgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config-dir", type=Path, help="models.d directory (default: ./models.d)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8009)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true",
                       help="log a line per HTTP request (off by default: events and /metrics say more, cheaper)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="serve a non-loopback address without API keys (anyone who can reach it may use it)")

    check = sub.add_parser("check", help="validate models.d and print what it serves")
    check.add_argument("--config-dir", type=Path, help="models.d directory (default: ./models.d)")

    default_url = os.environ.get("SPARKGATE_URL", "http://127.0.0.1:8009")
    ops = {
        "status": sub.add_parser("status", help="table of models: state, memory, in flight, idle for, last error"),
        "start": sub.add_parser("start", help="start a model (returns at once)"),
        "warm": sub.add_parser("warm", help="start a model and show its progress until it is ready"),
        "stop": sub.add_parser("stop", help="stop a model"),
        "logs": sub.add_parser("logs", help="the last lines a model's engine printed"),
        "reload": sub.add_parser("reload", help="re-read models.d without disturbing running models"),
    }
    for name, op in ops.items():
        op.add_argument("--url", default=default_url, help="the gateway (env SPARKGATE_URL); admin key from "
                        "SPARKGATE_ADMIN_KEY")
        if name in ("start", "warm", "stop", "logs"):
            op.add_argument("model")
    ops["status"].add_argument("--watch", action="store_true", help="refresh until interrupted")
    ops["status"].add_argument("--interval", type=float, default=2.0)
    ops["logs"].add_argument("--lines", type=int, default=100)
    for name in ("start", "warm"):
        ops[name].add_argument("--timeout", type=float, default=3600, help="give up following after this long")

    args = parser.parse_args(argv)
    if args.command in ops:
        from gateway.client import run

        try:
            return run(args.command, args)
        except KeyboardInterrupt:
            return 130
    overrides = {k: v for k, v in {"config_dir": args.config_dir, "host": getattr(args, "host", None),
                                    "port": getattr(args, "port", None),
                                    "insecure_no_auth": getattr(args, "insecure_no_auth", None) or None,
                                    }.items() if v is not None}
    settings = GatewaySettings(**overrides)
    # Each node's memory is read once, here: the gateway's budgets, models.d's fractions and every reload use it.
    settings = settings.model_copy(update={"nodes": compose.resolve_nodes(settings.nodes)})
    try:
        loaded = load(settings.config_dir, settings.stats_db, settings.nodes, gateway=(settings.host, settings.port))
    except ConfigError as exc:
        print(f"sparkgate: {exc}", file=sys.stderr)
        return 2
    registry = loaded.registry
    problems = budget_problems(registry.values(), compose.budgets(settings.nodes), compose.labels(settings.nodes))
    if problems:
        print(format_nodes(settings.nodes), file=sys.stderr)  # where the totals came from
        print(f"sparkgate: {ConfigError(problems)}", file=sys.stderr)
        return 2
    try:
        keys = load_keys(settings.api_keys, settings.api_keys_file)
    except AuthError as exc:
        print(f"sparkgate: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve" and not keys and not is_loopback(settings.host) and not settings.insecure_no_auth:
        print(f"sparkgate: refusing to serve {settings.host} without API keys: anyone who can reach it could use "
              "every model. Configure keys (SPARKGATE_API_KEYS or SPARKGATE_API_KEYS_FILE), bind 127.0.0.1, or pass "
              "--insecure-no-auth.", file=sys.stderr)
        return 2
    if args.command == "check":
        print(format_nodes(settings.nodes))
        print()
        print(format_table(registry))
        said = format_notes(loaded)
        if said:
            print()
            print(said)
        print(f"\n{len(registry)} model(s) OK in {settings.config_dir}")
        return 0
    for model, lines in loaded.warnings.items():
        for line in lines:
            print(f"sparkgate: warning: {model}: {line}", file=sys.stderr)
    return serve_forever(settings, registry, args.log_level, args.access_log)


def serve_forever(settings: GatewaySettings, registry: Registry, log_level: str, access_log: bool = False) -> int:
    from gateway.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings, registry)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, loop=_loop(), http="httptools",
        timeout_graceful_shutdown=30,
        access_log=access_log,
        # X-Forwarded-For is not used (no per-client-address logic), and the middleware costs ~1% per request.
        proxy_headers=False,
        # Longer than clients keep idle connections (httpx 5 s, browsers ~60 s): a client should not
        # send a request on a connection the server is closing at that instant.
        timeout_keep_alive=75,
    )
    _Server(config).run()
    return 0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the SIGTERM/SIGINT it handled once it has shut down gracefully, so the
            # process would die by the signal (status 143); a drained shutdown is a clean exit (0).
            self._captured_signals.clear()


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def format_table(registry: Registry) -> str:
    rows = [("MODEL", "ALIASES", "ENGINE", "RUNTIME", "MEMORY", "FRACTION", "ASLEEP", "IDLE", "START TIMEOUT",
             "FILE")]
    for spec in registry.values():
        fraction = "-" if spec.gpu_memory_utilization is None else f"{spec.gpu_memory_utilization:g}"
        rows.append((
            spec.name,
            ",".join(spec.aliases) or "-",
            spec.engine.value,
            spec.runtime.value,
            f"{spec.memory_gb:g} GB",
            fraction + (" (derived)" if spec.memory_fraction_derived else ""),
            f"{spec.sleeping_gb:g} GB" if spec.idle_action == "sleep" else "-",
            format_duration(spec.idle_timeout) if spec.idle_timeout else "never",
            format_duration(spec.start_timeout),
            spec.source.name if spec.source else "-",
        ))
    return _columns(rows)


def format_nodes(nodes: dict[str, NodeConfig]) -> str:
    """Each node's memory and where its total came from (read from the machine unless configured)."""
    rows = [("NODE", "TOTAL", "RESERVE", "BUDGET", "MEMORY", "TOTAL FROM")]
    for name, node in nodes.items():
        total = node.total_gb or 0.0
        rows.append((name, f"{total:.1f} GB", f"{node.reserve_gb:g} GB", f"{max(total - node.reserve_gb, 0):.1f} GB",
                     describe_unified(node.unified_memory), node.total_source or "configured"))
    return _columns(rows)


def format_notes(loaded: Loaded) -> str:
    """What the load derived or learned per model, then what looks wrong (a warning does not stop the load)."""
    lines = [f"{model}: {line}" for model, said in loaded.notes.items() for line in said]
    lines += [f"{model}: warning: {line}" for model, said in loaded.warnings.items() for line in said]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


if __name__ == "__main__":
    sys.exit(main())
