"""Gateway settings: environment (SPARKGATE_*), then command-line flags on top. Data only: gateway/app.py
builds the waker from them (through waker/compose.py)."""

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StringConstraints, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gateway.auth import ApiKeySpec
from stats.store import default_db_path
from waker.config.durations import Duration
from waker.config.nodes import NodeConfig


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key {key!r} is given twice in one JSON object; JSON would keep only the last")
        found[key] = value
    return found


class _Environment(EnvSettingsSource):
    """SPARKGATE_* variables, with JSON values (NODES, API_KEYS, ...) read strictly: a key given twice in one
    object is refused (json.loads keeps the last one silently: a second node of one name would replace the first)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if not isinstance(value, str | bytes):
            return super().decode_complex_value(field_name, field, value)
        return json.loads(value, object_pairs_hook=_unique_keys)


class GatewaySettings(BaseSettings):
    """Every float is finite (`allow_inf_nan`, and durations refuse nan and inf themselves): a timeout of nan made
    every request a 500 (tests/unit/gateway/test_settings_values.py)."""

    model_config = SettingsConfigDict(env_prefix="SPARKGATE_", extra="ignore", allow_inf_nan=False)

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls), dotenv_settings, file_secret_settings

    host: str = "127.0.0.1"
    port: int = Field(default=8009, ge=0, le=65535)
    config_dir: Path = Path("models.d")

    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="larger bodies get 413")
    keepalive_interval: Duration = Field(
        default=5.0, description="SSE comment every this long while a stream waits for a cold model (the 200 and a "
                                 "first comment go out at once; sooner when the client's SDK says it times out "
                                 "sooner); 0 = off: nothing is sent until the engine answers"
    )
    progress_interval: Duration = Field(
        default=10.0, gt=0, description="opt-in waking progress (a key's or model's `progress`) is refreshed this "
                                        "often with the time waited and the estimate; a new phase is shown at once"
    )
    upstream_connect_timeout: Duration = 10.0
    upstream_read_timeout: Duration = Field(
        default=900.0, description="longest silence from an engine mid-request before 504"
    )

    # Never 0: back-to-back readiness probes, probes that can't succeed, a reaper spinning on the loop.
    probe_interval: Duration = Field(default=0.05, gt=0)
    probe_timeout: Duration = Field(default=2.0, gt=0)
    reap_interval: Duration = Field(default=1.0, gt=0)
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
    list_aliases: bool = Field(
        default=True, description="list each alias in /v1/models as a model of its own; false: each model once, "
        "under its name, with its aliases in `aliases` (they route either way)")

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
    stats_db: Path = Field(default_factory=default_db_path, description="SQLite file of per-model memory samples; "
                                                                        "one that can't be opened turns stats off")
    stats_interval: Duration = Field(default=5.0, description="memory sampling interval; 0 = off")
    watch_config: bool = Field(default=False, description="reload models.d when its files change")
    instance: str = Field(
        default="default", pattern=r"^[A-Za-z0-9_.-]+$",
        description="name of this gateway on its Docker hosts; gateways sharing a daemon need different names",
    )
    request_timeout: Duration = Field(default=3600.0, description="longest a request may take in all; 0 = no limit")

    # Background tasks (gateway/tasks.py): titles, tags, follow-ups... never start, wake or wait for a model.
    task_model: str | None = Field(
        default=None, description="a model or alias that answers background tasks whose model can't take them at "
                                  "once (a small pinned or preloaded one); unset: such tasks get a fast 503")
    task_prefixes: list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]] = Field(
        default_factory=lambda: ["### Task:"],
        description="a non-streaming chat completion whose last user message starts with one of these is a "
                    "background task (Open WebUI's task prompts start with '### Task:'); [] = off")
    task_header: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
        description="a request header that marks a background task when its value is not empty, 0, false, no or "
                    "off (e.g. x-openwebui-task, filled by an Open WebUI connection header '{{TASK}}')")


def settings_problems(exc: ValidationError | SettingsError) -> list[str]:
    """Why the settings were refused, one line per problem, named as the variable that holds it (SPARKGATE_...,
    then the path into its JSON): for `sparkgate` to print instead of a traceback."""
    if isinstance(exc, SettingsError):
        return [f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)]
    lines = []
    for err in exc.errors():
        head, *rest = err["loc"] or ("(settings)",)
        name = f"SPARKGATE_{str(head).upper()}" + "".join(f"[{part!r}]" for part in rest)
        lines.append(f"{name}: {err['msg']}")
    return lines
