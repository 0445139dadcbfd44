"""Gateway settings: environment (SPARKGATE_*), then command-line flags on top. Data only: gateway/app.py
builds the waker from them (through waker/compose.py)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.auth import ApiKeySpec
from stats.store import default_db_path
from waker.config.durations import Duration
from waker.config.nodes import NodeConfig


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARKGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8009, ge=0, le=65535)
    config_dir: Path = Path("models.d")

    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="larger bodies get 413")
    keepalive_interval: Duration = Field(
        default=5.0, description="SSE comment every this long while a stream waits for a cold model; 0 = off"
    )
    upstream_connect_timeout: Duration = 10.0
    upstream_read_timeout: Duration = Field(
        default=900.0, description="longest silence from an engine mid-request before 504"
    )

    probe_interval: Duration = 0.05
    probe_timeout: Duration = 2.0
    reap_interval: Duration = 1.0
    log_tail_lines: int = Field(default=40, ge=0)
    backoff_cap: Duration = 300.0
    stop_retry: Duration = Field(
        default=30.0, description="keep trying to stop an engine this long while its Docker host is unreachable; "
                                  "then the model is failed, its memory still counted, and the stop retried later")

    nodes: dict[str, NodeConfig] = Field(
        default_factory=lambda: {"local": NodeConfig()},
        description='Docker hosts by name, as JSON: {"local": {}, "spark2": {"docker_host": "ssh://me@spark2"}}',
    )

    max_queue: int = Field(default=256, ge=0, description="requests waiting for room per node; beyond: 429")
    max_wait: Duration = Field(default=600.0, description="longest wait for room; beyond: 503 with the numbers")
    max_hold: Duration = Field(
        default=60.0, description="how long a busy model keeps taking new work while another waits for its memory"
    )
    preload: list[str] = Field(default_factory=list, description="models started at boot, in this order")

    api_keys: list[ApiKeySpec] = Field(
        default_factory=list, description='client keys, JSON: [{"key": "...", "name": "laptop", "models": ["*"]}]'
    )
    api_keys_file: Path | None = Field(default=None, description="a YAML/JSON file with the same list")
    admin_key: str | None = Field(default=None, description="key for /admin routes (separate from client keys)")
    insecure_no_auth: bool = Field(default=False, description="allow binding a non-loopback address without keys")
    cors_origins: list[str] = Field(default_factory=list, description='browser origins allowed, e.g. ["*"]')
    allowed_hosts: list[str] = Field(
        default_factory=list, description='names this gateway is reached by besides loopback, its bound address and IP '
                                          'addresses (the Host header; DNS rebinding), e.g. ["spark.lan"]; "*" = any')
    metrics_loopback_open: bool = Field(
        default=False, description="let loopback clients read /metrics and /metrics/engines without a key")
    max_header_bytes: int = Field(default=64 * 1024, gt=0, description="larger request headers get 431")
    stats_db: Path = Field(default_factory=default_db_path, description="SQLite file of per-model memory samples")
    stats_interval: Duration = Field(default=5.0, description="memory sampling interval; 0 = off")
    watch_config: bool = Field(default=False, description="reload models.d when its files change")
    instance: str = Field(
        default="default", pattern=r"^[A-Za-z0-9_.-]+$",
        description="name of this gateway on its Docker hosts; gateways sharing a daemon need different names",
    )
    request_timeout: Duration = Field(default=3600.0, description="longest a request may take in all; 0 = no limit")
