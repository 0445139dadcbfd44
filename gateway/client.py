"""The operator commands of `sparkgate` (status, start, stop, logs, warm, reload): a small client
of the admin API, with the standard library only."""

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO


class AdminClient:
    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, timeout: float = 30) -> Any:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = str(exc)
            raise SystemExit(f"sparkgate: {message}") from None
        except urllib.error.URLError as exc:
            raise SystemExit(f"sparkgate: cannot reach the gateway at {self.url}: {exc.reason}") from None


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def status_table(state: dict[str, Any]) -> str:
    several = len(state["nodes"]) > 1
    rows = [("MODEL", "STATE", *(("NODE",) if several else ()), "MEMORY", "IN FLIGHT", "QUEUED", "IDLE FOR",
             "LAST ERROR")]
    for m in state["models"]:
        where = (m.get("node") or "-",) if several else ()
        admission = m.get("admission") or {}
        queued = f", queued ({admission['position']})" if admission.get("outcome") == "queued" else ""
        rows.append((m["name"] + (" (pinned)" if m["pinned"] else ""), m["state"] + queued, *where,
                     f"{m['held_gb']:g}/{m['memory_gb']:g} GB", str(m["in_flight"]), str(m["queued"]),
                     _ago(m["idle_s"]), (m["last_error"] or "")[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for name, n in state["nodes"].items():
        live = "" if n["live_free_gb"] is None else f", {n['live_free_gb']:.1f} GB free on the machine"
        labels = ", ".join(f"{k}={v}" for k, v in n.get("labels", {}).items())
        source = f" ({n['total_source']})" if n.get("total_source") else ""
        # A total read from the machine is no round number (23.5401): tenths are enough to read.
        lines.append(f"node {name}: {n['held_gb']:g}/{round(n['capacity_gb'], 1):g} GB held{live}, {n['queued']} "
                     f"queued, {round(n['total_gb'], 1):g} GB total{source}" + (f" [{labels}]" if labels else ""))
    return "\n".join(lines)


def run(command: str, args: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    client = AdminClient(args.url, os.environ.get("SPARKGATE_ADMIN_KEY"))
    if command == "status":
        while True:
            text = status_table(client.call("GET", "/admin/state"))
            if not args.watch:
                print(text, file=out)
                return 0
            out.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + args.url + "\n\n" + text + "\n")
            out.flush()
            time.sleep(args.interval)
    if command == "logs":
        for line in client.call("GET", f"/admin/models/{args.model}/logs?lines={args.lines}")["lines"]:
            print(line, file=out)
        return 0
    if command == "stop":
        result = client.call("POST", f"/admin/models/{args.model}/stop", timeout=600)
        print(f"{result['model']}: {result['state']}", file=out)
        return 0
    if command == "reload":
        report = client.call("POST", "/admin/reload", timeout=120)
        for kind in ("added", "removed", "changed", "updated"):
            if report.get(kind):
                print(f"{kind}: {', '.join(report[kind])}", file=out)
        print(f"unchanged: {len(report.get('unchanged', []))} model(s) kept running untouched", file=out)
        return 0
    if command in ("start", "warm"):
        return warm(client, args.model, out, follow=command == "warm", limit=args.timeout,
                    interval=getattr(args, "interval", None) or POLL_INTERVAL)
    raise SystemExit(f"unknown command {command}")


POLL_INTERVAL = 0.5  # seconds between two looks at /admin/state while `warm` follows a start
LOG_INTERVAL = 2.0  # seconds between two looks at the engine's last log line


def queued_line(name: str, admission: dict[str, Any]) -> str:
    behind = ", ".join(admission["waiting_for"]) or "nothing (its turn is next)"
    return f"{name}: queued for memory behind {behind} (position {admission['position']})"


def warm(client: AdminClient, model: str, out: TextIO, follow: bool, limit: float, interval: float = POLL_INTERVAL,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Start a model and, with `follow`, show its progress until it is ready (0), or its start is refused or fails
    (1, with the reason), or `limit` seconds have passed (1).

    The start goes through admission like a request: a refusal at once is the gateway's error (no room ever, the
    queue full, the backoff of a crash loop) and ends here; a start queued for memory is shown with its place and
    what it waits behind. Only outcomes of this start count: the start's answer names the admission and start
    attempts it follows (`attempt`), so a failure or a refusal left from an earlier one is not taken for its own."""
    started = clock()
    answer = client.call("POST", f"/admin/models/{model}/start")
    name = answer["model"]
    attempt = answer.get("attempt") or {"admission": 0, "start": 0}
    if not follow:
        admission = answer.get("admission") or {}
        if admission.get("outcome") == "queued":
            print(queued_line(name, admission), file=out)
        else:
            print(f"{name}: {'ready' if answer['state'] == 'ready' else 'starting'}", file=out)
        return 0
    tty = out.isatty()
    last_log = ""
    next_logs = 0.0
    shown = ""
    while clock() - started < limit:
        state = next((m for m in client.call("GET", "/admin/state")["models"] if m["name"] == name), None)
        elapsed = clock() - started
        if state is None:
            print(("\n" if tty else "") + f"{name}: removed from models.d before it was ready", file=out)
            return 1
        admission = state.get("admission") or {}
        ours = admission.get("attempt", 0) >= attempt["admission"]
        started_ours = state.get("starts", 0) >= attempt["start"]
        if state["state"] == "ready":
            line = f"{name}: ready after {elapsed:.1f}s"
            print(("\r" + line.ljust(len(shown)) if tty else line), file=out)
            return 0
        if state["state"] == "failed" and started_ours:
            print(("\r" if tty else "") + f"{name}: failed: {state['last_error']}", file=out)
            for log_line in state["log_tail"]:
                print("  " + log_line, file=out)
            return 1
        if admission.get("outcome") == "refused" and ours and not started_ours:
            print(("\r" if tty else "") + f"{name}: refused: {admission['reason']}", file=out)
            return 1
        if state["state"] == "stopped" and started_ours and admission.get("outcome") != "queued":
            print(("\r" if tty else "") + f"{name}: stopped before it was ready", file=out)
            return 1
        if admission.get("outcome") == "queued":
            what = queued_line(name, admission)
        elif state["state"] == "failed":
            what = f"{name}: waiting to start (an earlier start failed)"
        else:
            if state["state"] in ("starting", "waking") and clock() >= next_logs:
                lines = client.call("GET", f"/admin/models/{name}/logs?lines=1")["lines"]
                last_log = lines[-1][:100] if lines else last_log
                next_logs = clock() + LOG_INTERVAL
            what = f"{name}: {state['state']:<9} {last_log}".rstrip()
        if tty:
            line = f"{what}  {elapsed:6.1f}s"
            out.write("\r" + line.ljust(len(shown)))
            out.flush()
            shown = line
        elif what != shown:  # a log, not a screen: a line when something changes, not at every look
            print(f"{what}  ({elapsed:.1f}s)", file=out)
            shown = what
        sleep(interval)
    print(("\n" if tty else "") + f"{name}: still not ready after {limit:.0f}s", file=out)
    return 1
