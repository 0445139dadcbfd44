"""`sparkgate`: serve, check, and the operator commands (status, warm, start, stop, logs, reload, stats)."""

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from gateway.auth import AuthError, is_loopback, load_keys
from gateway.config import Loaded, load
from gateway.service import Hangup, Notifier, health_main
from gateway.settings import GatewaySettings, settings_problems
from waker import compose
from waker.config import fit_check
from waker.config.checkpoint import read_checkpoint
from waker.config.durations import format_duration
from waker.config.machine import describe_unified
from waker.config.nodes import NodeConfig
from waker.config.registry import ConfigError, Registry
from waker.config.spec import ModelSpec
from waker.errors import ModelNotFound
from waker.scheduling.placement import budget_problems, candidates


def main(argv: list[str] | None = None, hangup: Hangup | None = None) -> int:
    """The `sparkgate` command. gateway/command.py, its entry point, catches SIGHUP for `serve` before this module's
    imports (seconds) and passes `hangup`; run otherwise (`python -m gateway.cli serve`), it is caught from here, before
    models.d, the machine's memory and the app: a SIGHUP while the gateway starts must not end it (gateway/service.py
    ::Hangup)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and hangup is None:
        hangup = Hangup()
        hangup.install()
    code = _command(argv, hangup)
    if hangup is not None and code != 0:  # it never served (models.d, keys): SIGHUP is its caller's again
        hangup.restore()
    return code


def _command(argv: list[str], hangup: Hangup | None) -> int:
    if argv[:1] == ["health"]:
        return health_main(argv[1:])
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

    # Listed for --help; run before parsing (gateway/service.py::health_main), without loading the gateway.
    sub.add_parser("health", help="exit 0 if the gateway SPARKGATE_HOST and SPARKGATE_PORT describe answers /health "
                   "(container health checks; a wildcard address is probed on loopback)")

    check = sub.add_parser(
        "check", help="validate models.d, print what it serves and whether each model fits in memory",
        description="Validate models.d, print what it serves, and check from the weights on disk whether each vLLM, "
        "SGLang, TensorRT-LLM and llama.cpp model will start with the memory its flag gives it: alone on each node, "
        "and in every --together group (each member started last beside the others).",
        epilog="Exit status: 0 when models.d is valid and no checked model will not start (CONTEXT CUT, OVER BUDGET "
        "and CAN'T TELL are warnings); 2 when models.d is invalid, a model WILL NOT START alone or in a --together "
        "group, or a group's memory_gb exceed its node's budget.")
    check.add_argument("--config-dir", type=Path, help="models.d directory (default: ./models.d)")
    check.add_argument("--together", action="append", default=[], metavar="A,B,...",
                       help="also check these models (names or aliases) loaded together on one node, each started "
                       "last; repeat for several groups")
    check.add_argument("--node-total", type=float, metavar="GIB",
                       help="check against nodes of this total memory instead of the machine's (e.g. 121.7, a DGX "
                       "Spark); unified memory unless SPARKGATE_NODES says unified_memory: false")

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
    ops["warm"].add_argument("--interval", type=float, default=0.5, help="seconds between two looks at the model")

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
    try:
        settings = GatewaySettings(**overrides)
    except (ValidationError, SettingsError) as exc:
        print("sparkgate: invalid settings:\n  " + "\n  ".join(settings_problems(exc)), file=sys.stderr)
        return 2
    if getattr(args, "node_total", None) is not None:  # sparkgate check --node-total
        if args.node_total <= 0:
            print("sparkgate: --node-total must be a positive number of GiB", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"nodes": nodes_of_total(settings.nodes, args.node_total)})
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
        return check_command(settings, loaded, args.together)
    for model, lines in loaded.warnings.items():
        for line in lines:
            print(f"sparkgate: warning: {model}: {line}", file=sys.stderr)
    return serve_forever(settings, registry, args.log_level, args.access_log, hangup)


def check_command(settings: GatewaySettings, loaded: Loaded, groups: list[str]) -> int:
    """`sparkgate check` once models.d loaded: the nodes, the models, what was derived, then the fit check's tables
    (alone, then each --together group). 2 when a model will not start or a group can't be held (see --help)."""
    registry = loaded.registry
    report = loaded.fit
    for group in groups:
        members, problem = _group(registry, group)
        node = ""
        if not problem:
            node, problem = _group_node(members, settings.nodes)
        if problem:
            print(f"sparkgate: --together {group}: {problem}", file=sys.stderr)
            return 2
        report = fit_check.together(members, node, settings.nodes[node], report, read_checkpoint)
    print(format_nodes(settings.nodes))
    print()
    print(format_table(registry))
    fit_lines = report.warnings()
    said = format_notes(replace(loaded, warnings={
        model: [line for line in lines if line not in fit_lines.get(model, ())]
        for model, lines in loaded.warnings.items()}))
    if said:
        print()
        print(said)
    for scenario in report.scenarios:
        print()
        print(format_fit(scenario))
    print(f"\n{len(registry)} model(s) OK in {settings.config_dir}")
    if report.fails:
        failed = sorted({e.model for s in report.scenarios for e in s.estimates
                         if e.verdict is fit_check.Verdict.WILL_NOT_START})
        over = sum(1 for s in report.scenarios if s.problems)
        what = ([f"{', '.join(failed)} will not start"] if failed else []) + (
            [f"{over} group(s) exceed the budget"] if over else [])
        print(f"sparkgate: fit check: {'; '.join(what)} (see above)", file=sys.stderr)
        return 2
    return 0


def _group(registry: Registry, group: str) -> tuple[list[ModelSpec], str]:
    """The models a --together value names (names or aliases, comma-separated), or why not."""
    members: list[ModelSpec] = []
    for name in (n.strip() for n in group.split(",") if n.strip()):
        try:
            spec = registry.resolve(name)
        except ModelNotFound:
            return [], f"no model or alias {name!r}"
        if spec not in members:
            members.append(spec)
    return members, "" if members else "names no model"


def _group_node(members: list[ModelSpec], nodes: dict[str, NodeConfig]) -> tuple[str, str]:
    """The first node (settings order) every member of a group may run on, or why there is none."""
    budgets, labels = compose.budgets(nodes), compose.labels(nodes)
    shared = [n for n in nodes if all(n in candidates(m, budgets, labels) for m in members)]
    if not shared:
        return "", "no node where all of them may run"
    return shared[0], ""


def nodes_of_total(nodes: dict[str, NodeConfig], total_gb: float) -> dict[str, NodeConfig]:
    """Every node with `total_gb` (`check --node-total`): unified memory unless configured otherwise, so that a check
    for a DGX Spark made on another machine counts the Spark's CUDA total."""
    return {name: node.model_copy(update={"total_gb": total_gb, "total_source": None, "unified_memory": (
        True if node.unified_memory is None else node.unified_memory)}) for name, node in nodes.items()}


def format_fit(scenario: fit_check.Scenario) -> str:
    """One scenario of the fit check: a table (GiB) and each verdict's reasons below it."""
    rows = [("MODEL", "ENGINE", "WEIGHTS", "KV (TOKENS)", "OVERHEAD", "NEEDS", "FLAG GIVES", "MEMORY_GB", "VERDICT")]
    for e in scenario.estimates:
        rows.append((e.model, e.engine, _fig(e.weights_gb), f"{_fig(e.kv_gb)} ({e.kv_tokens})" if e.kv_tokens else "-",
                     _fig(e.overhead_gb), _fig(e.needs_gb), _fig(e.gives_gb), f"{e.memory_gb:g}", e.verdict.value))
    lines = [f"Fit check, {scenario.title} (GiB):", _columns(rows)]
    lines += [f"  {scenario.node}: {problem}" for problem in scenario.problems]
    lines += [f"  {e.model}: {e.verdict.value}: {reason}" for e in scenario.estimates
              if e.verdict is not fit_check.Verdict.FITS for reason in e.reasons]
    return "\n".join(lines)


def _fig(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def serve_forever(settings: GatewaySettings, registry: Registry, log_level: str, access_log: bool = False,
                  hangup: Hangup | None = None) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a drained shutdown (a failed startup exits with uvicorn's status)."""
    from gateway.app import create_app

    if hangup is None:
        hangup = Hangup()
        hangup.install()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    notifier = Notifier.from_environ(os.environ)
    app = create_app(settings, registry, hangup=hangup)
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
    _Server(config, hangup, notifier).run()
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, and what the gateway owes its supervisor (gateway/service.py): readiness told to systemd
    once it serves, SIGHUP ignored from the start of its shutdown, and status 0 after a drained shutdown."""

    def __init__(self, config: uvicorn.Config, hangup: Hangup, notifier: Notifier) -> None:
        super().__init__(config)
        self._hangup = hangup
        self._notifier = notifier

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._notifier.notify("READY=1")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._hangup.stopping()
        self._notifier.notify("STOPPING=1")
        await super().shutdown(sockets)

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
