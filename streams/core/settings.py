"""The one settings class: environment variables with the `PIPELINE_` prefix, `.env` supported."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


# The dependencies a flow may name (`Flow.dependency`); PIPELINE_LIMITS is keyed by them.
DEPENDENCIES = ("mailer", "llm")
TOKEN_DEPENDENCIES = ("llm",)


class DependencyLimits(BaseModel):
    """What one dependency (a provider) allows, across every worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: float | None = Field(None, gt=0, le=1_000_000)
    max_concurrency: int | None = Field(None, ge=1, le=100_000)
    tokens_per_minute: int | None = Field(None, ge=1)


class Settings(BaseSettings):
    """Pipeline configuration, validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", env_file=".env", extra="ignore", frozen=True)

    rabbit_url: str = Field("amqp://guest:guest@localhost:5672/", description="RabbitMQ URL (`amqp://` or `amqps://`).")
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis URL (`redis://`, `rediss://` or `unix://`): streams, retries, shared limits.",
    )
    database_url: str = Field(
        "sqlite+aiosqlite:///./pipeline.db",
        description="Event store: `sqlite+aiosqlite:///path` or `postgresql+asyncpg://user@host/db`.",
    )

    mailer: Literal["log", "http"] = Field(
        "log", description="E-mail adapter: `log` writes the mail to the log, `http` POSTs it to PIPELINE_MAILER_URL."
    )
    mailer_url: HttpUrl | None = Field(None, description="The mail provider's endpoint (needed when mailer is `http`).")
    mailer_api_key: SecretStr | None = Field(None, description="Bearer token for the mail provider.")
    mailer_timeout: float = Field(10.0, gt=0, description="Seconds one mail provider call may take.")

    llm: Literal["echo", "openai"] = Field(
        "echo", description="Completion adapter: `echo` answers with the prompt, `openai` calls PIPELINE_LLM_URL."
    )
    llm_url: HttpUrl | None = Field(
        None, description="Base URL of an OpenAI-compatible API, e.g. `https://api.openai.com/v1`."
    )
    llm_api_key: SecretStr | None = Field(None, description="Bearer token for the completion API.")
    llm_timeout: float = Field(60.0, gt=0, description="Seconds one completion call may take.")

    limits: Annotated[dict[str, DependencyLimits], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Limits per dependency (`mailer`, `llm`), shared by every worker through Redis, as JSON: "
            '`{"mailer": {"requests_per_second": 14, "max_concurrency": 32}, '
            '"llm": {"requests_per_second": 8, "tokens_per_minute": 90000}}`.'
        ),
    )
    limit_max_wait: float = Field(
        5.0,
        ge=0,
        le=300,
        description=(
            "Seconds a message may wait in the worker for its dependency's limit; "
            "a longer wait becomes a broker-held delay (no attempt used)."
        ),
    )

    retry_max_attempts: int = Field(
        5, ge=1, le=100, description="Attempts before a transient failure is dead-lettered."
    )
    retry_base_delay: float = Field(1.0, gt=0, description="Backoff after the first failed attempt, in seconds.")
    retry_max_delay: float = Field(300.0, gt=0, le=65_535, description="Longest backoff between attempts, in seconds.")
    retry_max_age: float = Field(
        86_400.0, gt=0, description="Seconds after its first failure a message is dead-lettered, whatever its attempts."
    )
    retry_jitter: Literal["full", "equal", "none"] = Field(
        "full", description="Backoff jitter: `full` (0..ceiling), `equal` (half fixed, half random) or `none`."
    )
    retry_overrides: dict[str, RetryOverride] = Field(
        default_factory=dict,
        description='Retry limits per flow, as JSON: `{"completion": {"max_attempts": 3, "max_delay": 60}}`.',
    )

    delivery_limit: int = Field(
        5, ge=1, le=19, description="A message whose worker died this many times while handling it is poison."
    )
    consumer_name: str | None = Field(
        None, description="Redis consumer name within the groups; unset: `worker` (each process is told apart)."
    )
    redis_claim_idle_ms: int = Field(
        60_000, ge=100, description="A Redis entry pending this long on a dead consumer is claimed by another worker."
    )
    redis_mover_interval_ms: int = Field(
        200, ge=10, description="How often due Redis retries are moved back onto their stream."
    )

    db_auto_upgrade: bool | None = Field(
        None,
        description=(
            "Apply pending schema migrations at start-up; unset: yes for SQLite, no for PostgreSQL "
            "(run `pipeline db upgrade` once before the workers roll out)."
        ),
    )
    store_batch_max: int = Field(256, ge=1, le=10_000, description="Most messages one group commit holds.")
    store_batch_wait_ms: float = Field(
        0.0, ge=0, le=1_000, description="How long a group commit waits for more messages before it writes."
    )
    outbox_orphan_seconds: float = Field(
        30.0, gt=0, description="Outbox rows a dead worker left unpublished are taken over by another after this long."
    )

    breaker_threshold: int = Field(
        5, ge=1, le=1_000, description="Consecutive dependency failures that open its circuit breaker."
    )
    breaker_recovery_seconds: float = Field(30.0, gt=0, description="Seconds an open breaker waits before probing.")
    breaker_probes: int = Field(1, ge=1, le=100, description="Messages let through to probe a half-open breaker.")

    max_body_bytes: int = Field(1_048_576, ge=1, description="Larger messages are dead-lettered as `invalid` unread.")
    alert_url: HttpUrl | None = Field(
        None, description="Webhook POSTed for every dead letter; unset: a warning log line."
    )

    rabbit_prefetch: int = Field(
        128, ge=1, le=65_535, description="Deliveries a worker holds at once on each command queue."
    )
    redis_read_count: int = Field(256, ge=1, le=10_000, description="Most entries one Redis stream read returns.")
    redis_max_workers: int = Field(
        256, ge=1, le=1_000, description="Entries of one stream handled at once, a read's and those still running."
    )
    redis_batch_hold_ms: int = Field(
        200,
        ge=0,
        description=(
            "How long a read waits for its slowest entries before it acknowledges what finished and reads on "
            "(entries still running are acknowledged when they end)."
        ),
    )
    redis_max_connections: int = Field(
        64,
        ge=4,
        le=10_000,
        description="Connections the worker's own Redis client opens at most; calls beyond it wait for a free one.",
    )
    redis_polling_ms: int = Field(100, ge=1, description="How long one Redis stream read blocks waiting for entries.")
    redis_reclaim_polling_ms: int = Field(
        1_000, ge=1, description="How often a worker looks for entries a dead consumer left pending."
    )

    service_name: str = Field("pipeline", description="Service name in logs and metrics.")
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`json` lines, `console`, or `auto` (console on a terminal, JSON otherwise)."
    )
    graceful_timeout: float = Field(
        20.0, gt=0, description="Seconds a stopping worker waits for messages in flight before it exits."
    )

    @field_validator("limits", mode="before")
    @classmethod
    def _limits_json(cls, value: object) -> object:
        if not isinstance(value, str | bytes):
            return value
        try:
            return json.loads(value or "{}")
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None

    @field_validator("limits")
    @classmethod
    def _known_dependencies(cls, value: dict[str, DependencyLimits]) -> dict[str, DependencyLimits]:
        for dependency, limits in value.items():
            if dependency not in DEPENDENCIES:
                known = ", ".join(DEPENDENCIES)
                raise ValueError(f"unknown dependency {dependency!r} (known: {known})")
            if limits.tokens_per_minute is not None and dependency not in TOKEN_DEPENDENCIES:
                raise ValueError(f"tokens_per_minute applies to llm only, not {dependency!r}")
        return value

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


def describe_errors(exc: ValidationError) -> str:
    """A settings validation error as one line naming each bad variable: `PIPELINE_X (path): what`."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        name = f"PIPELINE_{loc[0].upper()}" if loc else "settings"
        inner = f" ({'.'.join(loc[1:])})" if len(loc) > 1 else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}{inner}: {message}")
    return "; ".join(problems)
