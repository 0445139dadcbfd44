"""The operator commands of `sparkgate` (status, start, stop, logs, warm, reload): a small client
of the admin API, with the standard library only."""

import json
import os
import sys
import time
import urllib.error
import urllib.request
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
        rows.append((m["name"] + (" (pinned)" if m["pinned"] else ""), m["state"], *where,
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
        return warm(client, args.model, out, follow=command == "warm", limit=args.timeout)
    raise SystemExit(f"unknown command {command}")


def warm(client: AdminClient, model: str, out: TextIO, follow: bool, limit: float) -> int:
    """Start a model and, with `follow`, show its progress until it is ready (or failed)."""
    started = time.monotonic()
    client.call("POST", f"/admin/models/{model}/start")
    if not follow:
        print(f"{model}: starting", file=out)
        return 0
    tty = out.isatty()
    last_log = ""
    next_logs = 0.0
    while time.monotonic() - started < limit:
        state = next(m for m in client.call("GET", "/admin/state")["models"] if m["name"] == model or
                     model in m["aliases"])
        elapsed = time.monotonic() - started
        if time.monotonic() >= next_logs:
            lines = client.call("GET", f"/admin/models/{state['name']}/logs?lines=1")["lines"]
            last_log = lines[-1][:100] if lines else last_log
            next_logs = time.monotonic() + 2
        line = f"{state['name']}: {state['state']:<9} {elapsed:6.1f}s  {last_log}"
        if state["state"] == "ready":
            print(("\r" if tty else "") + f"{state['name']}: ready after {elapsed:.1f}s".ljust(len(line)), file=out)
            return 0
        if state["state"] == "failed":
            print(("\r" if tty else "") + f"{state['name']}: failed: {state['last_error']}", file=out)
            for log_line in state["log_tail"]:
                print("  " + log_line, file=out)
            return 1
        if tty:
            out.write("\r" + line)
            out.flush()
        else:
            print(line, file=out)
        time.sleep(0.5)
    print(f"\n{model}: still not ready after {limit:.0f}s", file=out)
    return 1
