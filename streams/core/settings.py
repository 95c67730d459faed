"""The one settings class: environment variables with the `PIPELINE_` prefix, `.env` supported."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.core.retry import RetryPolicy

_URL_SCHEMES = {
    "rabbit_url": ("amqp", "amqps"),
    "redis_url": ("redis", "rediss", "unix"),
}


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs, health and docs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RetryOverride(BaseModel):
    """A flow's own retry limits; unset fields take the global ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int | None = Field(None, ge=1, le=100)
    base_delay: float | None = Field(None, gt=0)
    max_delay: float | None = Field(None, gt=0, le=65_535)
    max_age: float | None = Field(None, gt=0)


class Settings(BaseSettings):
    """Pipeline configuration, validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", env_file=".env", extra="ignore", frozen=True)

    rabbit_url: str = "amqp://guest:guest@localhost:5672/"
    redis_url: str = "redis://localhost:6379/0"
    database_url: str = "sqlite+aiosqlite:///./pipeline.db"

    mailer: Literal["log", "http"] = "log"
    mailer_url: HttpUrl | None = None
    mailer_api_key: SecretStr | None = None
    mailer_timeout: float = Field(10.0, gt=0)

    llm: Literal["echo", "openai"] = "echo"
    llm_url: HttpUrl | None = None
    llm_api_key: SecretStr | None = None
    llm_timeout: float = Field(60.0, gt=0)

    retry_max_attempts: int = Field(5, ge=1, le=100)
    retry_base_delay: float = Field(1.0, gt=0)
    retry_max_delay: float = Field(300.0, gt=0, le=65_535)
    retry_max_age: float = Field(86_400.0, gt=0)
    retry_jitter: Literal["full", "equal", "none"] = "full"
    # Per-flow overrides, e.g. PIPELINE_RETRY_OVERRIDES='{"completion": {"max_attempts": 3}}'
    retry_overrides: dict[str, RetryOverride] = Field(default_factory=dict)

    # A message whose worker died this many times while handling it is poison (streams.policy.suspects).
    delivery_limit: int = Field(5, ge=1, le=19)
    consumer_name: str | None = None
    redis_claim_idle_ms: int = Field(60_000, ge=100)
    redis_mover_interval_ms: int = Field(200, ge=10)

    # Apply pending schema migrations at start-up; unset: yes for SQLite, no for PostgreSQL (where
    # `pipeline db upgrade` runs once, before the workers roll out).
    db_auto_upgrade: bool | None = None
    store_batch_max: int = Field(256, ge=1, le=10_000)
    store_batch_wait_ms: float = Field(0.0, ge=0, le=1_000)
    # Outbox rows a dead worker left unpublished are taken over by another after this long.
    outbox_orphan_seconds: float = Field(30.0, gt=0)

    breaker_threshold: int = Field(5, ge=1, le=1_000)
    breaker_recovery_seconds: float = Field(30.0, gt=0)
    breaker_probes: int = Field(1, ge=1, le=100)

    max_body_bytes: int = Field(1_048_576, ge=1)
    alert_url: HttpUrl | None = None

    # Deliveries a worker holds at once on each command queue; handled side by side, their
    # commits sharing transactions.
    rabbit_prefetch: int = Field(128, ge=1, le=65_535)
    redis_read_count: int = Field(256, ge=1, le=10_000)
    # Entries of one stream handled at once: a read's, and those left running after it.
    redis_max_workers: int = Field(256, ge=1, le=1_000)
    # How long a read's call waits for its slowest entries before it acknowledges what finished and
    # reads on (what still runs is acknowledged when it ends).
    redis_batch_hold_ms: int = Field(200, ge=0)
    redis_polling_ms: int = Field(100, ge=1)
    # How often a reclaiming subscriber looks for entries a dead consumer left pending.
    redis_reclaim_polling_ms: int = Field(1_000, ge=1)

    service_name: str = "pipeline"
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    graceful_timeout: float = Field(20.0, gt=0)

    @field_validator("rabbit_url", "redis_url")
    @classmethod
    def _known_scheme(cls, value: str, info: ValidationInfo) -> str:
        name = info.field_name or ""
        scheme = urlsplit(value).scheme
        allowed = _URL_SCHEMES.get(name, ())
        if scheme not in allowed:
            raise ValueError(f"scheme {scheme!r} is not one of {', '.join(allowed)}")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.mailer == "http" and self.mailer_url is None:
            raise ValueError("PIPELINE_MAILER=http needs PIPELINE_MAILER_URL")
        if self.llm == "openai" and self.llm_url is None:
            raise ValueError("PIPELINE_LLM=openai needs PIPELINE_LLM_URL")
        if self.retry_max_delay < self.retry_base_delay:
            raise ValueError("PIPELINE_RETRY_MAX_DELAY must be >= PIPELINE_RETRY_BASE_DELAY")
        return self

    @property
    def auto_upgrade(self) -> bool:
        """Whether the worker migrates the schema itself."""
        if self.db_auto_upgrade is not None:
            return self.db_auto_upgrade
        return self.database_url.startswith("sqlite")

    def retry_policy(self, flow: str) -> RetryPolicy:
        """The retry policy of a flow: its overrides over the global settings."""
        o = self.retry_overrides.get(flow, RetryOverride())
        return RetryPolicy(
            max_attempts=o.max_attempts or self.retry_max_attempts,
            base_delay=o.base_delay or self.retry_base_delay,
            max_delay=o.max_delay or self.retry_max_delay,
            max_age=o.max_age or self.retry_max_age,
            jitter=self.retry_jitter,
        )

    def safe_dump(self) -> dict[str, object]:
        """Settings as shown to operators: URLs masked, secrets hidden."""
        data = self.model_dump(mode="json")
        for key, value in data.items():
            if key.endswith("_url") and value:
                data[key] = mask_url(str(value))
        return data


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
