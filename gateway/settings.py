"""Gateway settings: environment (SPARKGATE_*), then command-line flags on top."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from waker.durations import Duration
from waker.options import WakerOptions


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

    probe_interval: Duration = 0.1
    probe_timeout: Duration = 2.0
    reap_interval: Duration = 1.0
    log_tail_lines: int = Field(default=40, ge=0)
    backoff_cap: Duration = 300.0

    def waker_options(self) -> WakerOptions:
        return WakerOptions(
            probe_interval=self.probe_interval,
            probe_timeout=self.probe_timeout,
            reap_interval=self.reap_interval,
            log_tail_lines=self.log_tail_lines,
            backoff_cap=self.backoff_cap,
        )
