"""Deployment files: compose file per profile, Grafana dashboard, systemd unit, Dockerfile.

`docker-compose config` (or `docker compose config`) only parses and interpolates the file: it needs the
compose binary but neither a running daemon nor any image. The Dockerfile is checked as text: its base
image (python:3.11-slim) can't be pulled where these tests run, so the image is never built here.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "sparkgate.json"
METRICS_SOURCE = ROOT / "gateway" / "metrics.py"

PROFILES: dict[str | None, set[str]] = {
    None: {"sparkgate"},
    "webui": {"sparkgate", "open-webui"},
    "monitoring": {"sparkgate", "prometheus", "grafana"},
}


def compose_command() -> list[str]:
    """`docker-compose` (Debian's package, v1 or v2) or the `docker compose` plugin, whichever exists."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 check=False).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the docker compose plugin is installed")


def supports_json(cmd: list[str]) -> bool:
    # Compose v2 has `config --format json`; v1 (1.29) prints YAML only.
    out = subprocess.run([*cmd, "config", "--help"], capture_output=True, text=True, check=False)
    return "--format" in out.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of compose/ with .env made from .env.example, and an empty models.d next to it."""
    root = tmp_path_factory.mktemp("deploy")
    shutil.copytree(COMPOSE, root / "compose", ignore=shutil.ignore_patterns(".env"))
    shutil.copy(COMPOSE / ".env.example", root / "compose" / ".env")
    (root / "models.d").mkdir()
    return root / "compose"


def compose_config(project: Path, profile: str | None) -> dict[str, Any]:
    cmd = compose_command()
    args = [*cmd, "--project-directory", str(project), "-f", str(project / "docker-compose.yml")]
    if profile:
        args += ["--profile", profile]
    args.append("config")
    json_out = supports_json(cmd)
    if json_out:
        args += ["--format", "json"]
    done = subprocess.run(args, cwd=project, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout) if json_out else yaml.safe_load(done.stdout)
    # v2 prints only the services the profiles enable; v1.29 prints all of them with their `profiles`.
    # Keep what `up` would start, the same way for both.
    config["services"] = {name: service for name, service in config["services"].items()
                          if not service.get("profiles") or profile in service["profiles"]}
    return config


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """target -> source, for both the short (v1) and the long (v2) volume syntax."""
    result = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        result[target] = source
    return result


@pytest.mark.parametrize("profile", list(PROFILES), ids=lambda p: p or "default")
def test_compose_config_per_profile(project: Path, profile: str | None) -> None:
    config = compose_config(project, profile)
    assert set(config["services"]) == PROFILES[profile]

    gateway = config["services"]["sparkgate"]
    assert gateway["network_mode"] == "host"
    assert "ports" not in gateway  # host networking: nothing to publish
    assert gateway["restart"] == "unless-stopped"
    assert gateway["image"] == "sparkgate:local"
    # Where the gateway listens, not always 127.0.0.1 (tests/deploy/test_health_check.py).
    assert gateway["healthcheck"]["test"] == ["CMD", "sparkgate", "health"]
    mounts = volume_targets(gateway)
    assert mounts["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert "/etc/sparkgate/models.d" in mounts
    assert Path(mounts["/etc/sparkgate/models.d"]).name == "models.d"
    assert mounts["/var/lib/sparkgate"] == "sparkgate-stats"
    env = gateway["environment"]
    assert env["SPARKGATE_HOST"] == "127.0.0.1"  # loopback unless .env says otherwise
    assert env["SPARKGATE_CONFIG_DIR"] == "/etc/sparkgate/models.d"
    assert json.loads(env["SPARKGATE_API_KEYS"])  # from .env via env_file: valid JSON, at least one key
    assert env["SPARKGATE_ADMIN_KEY"]

    for name in PROFILES[profile] - {"sparkgate"}:
        service = config["services"][name]
        assert service["network_mode"] == "host"
        assert service["restart"] == "unless-stopped"
    if profile == "webui":
        webui = config["services"]["open-webui"]["environment"]
        assert webui["OPENAI_API_BASE_URL"] == "http://127.0.0.1:8009/v1"
        keys = {k["key"] for k in json.loads(env["SPARKGATE_API_KEYS"])}
        assert webui["OPENAI_API_KEY"] in keys  # Open WebUI's key is one the gateway accepts
        # Titles and tags go to the pinned utility model; a total timeout that covers a 30-minute first load, and an
        # idle timeout the gateway's keep-alive comments (every 5 s) satisfy.
        assert webui["TASK_MODEL_EXTERNAL"] == "utility"
        assert int(webui["AIOHTTP_CLIENT_TIMEOUT"]) >= 30 * 60
        assert int(webui["AIOHTTP_CLIENT_STREAM_IDLE_TIMEOUT"]) > 5
    if profile == "monitoring":
        assert volume_targets(config["services"]["prometheus"])["/etc/prometheus/prometheus.yml"].endswith(
            "prometheus.yml")
        assert "/etc/grafana/provisioning" in volume_targets(config["services"]["grafana"])


def test_compose_without_env_file_fails_loudly(tmp_path: Path) -> None:
    # The .env file carries the keys: forgetting to create it must not start an unconfigured gateway.
    shutil.copytree(COMPOSE, tmp_path / "compose", ignore=shutil.ignore_patterns(".env"))
    cmd = compose_command()
    done = subprocess.run([*cmd, "-f", str(tmp_path / "compose" / "docker-compose.yml"), "config"],
                          cwd=tmp_path / "compose", capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert ".env" in done.stderr


def test_prometheus_scrapes_both_gateway_endpoints() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    paths = {job["metrics_path"] for job in config["scrape_configs"]}
    assert paths == {"/metrics", "/metrics/engines"}


def test_grafana_provisioning_parses() -> None:
    datasources = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    providers = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids


def defined_metrics() -> set[str]:
    """Metric names gateway/metrics.py defines: f"{PREFIX}name" with PREFIX = "sparkgate_"."""
    source = METRICS_SOURCE.read_text()
    prefix = re.search(r'^PREFIX = "([a-z_]+)"', source, re.M)
    assert prefix, "PREFIX not found in gateway/metrics.py"
    names = {prefix.group(1) + n for n in re.findall(r'f"\{PREFIX\}([a-z0-9_]+)"', source)}
    assert len(names) > 10
    return names


def test_dashboard_queries_use_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = defined_metrics()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 6
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bsparkgate_[a-z0-9_]+", expr))
        assert names, f"no sparkgate metric in {expr!r}"
        for name in names:
            # Histograms are queried through their _bucket / _sum / _count series.
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, f"{name} (in {expr!r}) is not defined in gateway/metrics.py"
        used |= names
    for wanted in ("sparkgate_requests_total", "sparkgate_time_to_first_byte_seconds_bucket",
                   "sparkgate_model_state", "sparkgate_budget_used_gb", "sparkgate_budget_total_gb",
                   "sparkgate_cold_starts_total", "sparkgate_evictions_total", "sparkgate_queue_depth"):
        assert wanted in used


def test_systemd_unit() -> None:
    text = (ROOT / "deploy" / "sparkgate.service").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    sections = [line for line in lines if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    keys = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("["))
    assert keys["ExecStart"].endswith("sparkgate serve")
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert keys["EnvironmentFile"] == "/etc/sparkgate/env"
    assert keys["KillSignal"] == "SIGTERM"
    assert keys["Restart"] == "on-failure"


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert re.search(r"^EXPOSE 8009$", text, re.M)
    assert re.search(r"^CMD \[\"sparkgate\", \"serve\"\]$", text, re.M)
    healthcheck = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", text, re.M)
    assert healthcheck, "HEALTHCHECK with an exec-form CMD not found"
    probe = json.loads(healthcheck.group(1))
    assert probe == ["sparkgate", "health"]  # where the gateway listens (tests/deploy/test_health_check.py)
    for setting in ("SPARKGATE_HOST=0.0.0.0", "SPARKGATE_CONFIG_DIR=/etc/sparkgate/models.d",
                    "SPARKGATE_STATS_DB=/var/lib/sparkgate/stats.sqlite3"):
        assert setting in text
    # Everything `pip install .` needs is let into the build context.
    ignore = (ROOT / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "gateway/", "waker/", "stats/"):
        assert f"!{needed}" in ignore
        assert re.search(rf"^COPY {re.escape(needed.rstrip('/'))}\b", text, re.M) or needed in text
