"""The measurement records shared by the runner and the report (plain data, JSON round-trip)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# What XREAD / XREADGROUP answer: [(stream, [(entry id, fields)])], or None after BLOCK timed out.
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None


@dataclass
class Sample:
    """One contender in one round."""

    contender: str
    round: int
    n: int
    drain_rate: float = math.nan  # messages per second, first to last handled
    cpu_us_per_msg: float = math.nan  # consumer process user + system CPU per message
    peak_rss_mb: float = math.nan  # VmHWM of the consumer process
    seconds: float = math.nan  # drain duration
    handled: int = 0  # messages timed: n, or fewer when the time cap ended the drain
    machine_busy: float = math.nan  # share of all CPUs busy during the drain, whoever used them (0..1)
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_rate: float | None = None  # the fixed publish rate (half this round's drain rate)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def capped(self) -> bool:
        """True when the drain was timed on fewer than n messages (time cap)."""
        return self.error is None and 0 < self.handled < self.n

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        return {k: _clean(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        """Back from JSON (None becomes NaN for the float metrics)."""
        values = dict(data)
        for key in ("drain_rate", "cpu_us_per_msg", "peak_rss_mb", "seconds", "machine_busy"):
            if values.get(key) is None:
                values[key] = math.nan
        return cls(**values)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class ContenderInfo:
    """How a contender is shown."""

    key: str
    label: str
    broker: str
    what: str


CONTENDERS: dict[str, ContenderInfo] = {
    c.key: c
    for c in (
        ContenderInfo("rabbit-aiopika", "(a) aio-pika queue.iterator()", "RabbitMQ", "consume + validate + ack each"),
        ContenderInfo("rabbit-faststream", "(b) bare FastStream", "RabbitMQ", "consume + validate + ack"),
        ContenderInfo("rabbit-dramatiq", "(c) Dramatiq, 8 threads", "RabbitMQ", "consume + validate + ack"),
        ContenderInfo(
            "rabbit-handrolled",
            "(h) hand-rolled FastStream + SQLAlchemy",
            "RabbitMQ",
            "validate, one transaction (inbox, event, outbox), confirmed outcome publish, outbox marked, ack",
        ),
        ContenderInfo(
            "rabbit-pipeline-sqlite",
            "(d) pipeline, SQLite",
            "RabbitMQ",
            "validate, inbox, events, outbox, outcome publish, ack",
        ),
        ContenderInfo(
            "rabbit-pipeline-sqlite-info",
            "(d) pipeline, SQLite, at INFO",
            "RabbitMQ",
            "as (d), logging at INFO: one JSON line per outcome, to a file",
        ),
        ContenderInfo(
            "rabbit-pipeline-postgres",
            "(d) pipeline, PostgreSQL",
            "RabbitMQ",
            "validate, inbox, events, outbox, outcome publish, ack",
        ),
        ContenderInfo("redis-raw", "(e) redis-py XREADGROUP loop", "Redis", "consume + validate, one XACK per batch"),
        ContenderInfo("redis-faststream", "(f) bare FastStream stream", "Redis", "consume + validate + XACK each"),
        ContenderInfo(
            "redis-handrolled",
            "(i) hand-rolled FastStream + SQLAlchemy",
            "Redis",
            "validate, one transaction (inbox, event, outbox), outcome XADD, outbox marked, XACK",
        ),
        ContenderInfo(
            "redis-pipeline-sqlite",
            "(g) pipeline, SQLite",
            "Redis",
            "validate, inbox, events, outbox, outcome publish, ack",
        ),
        ContenderInfo(
            "redis-pipeline-sqlite-info",
            "(g) pipeline, SQLite, at INFO",
            "Redis",
            "as (g), logging at INFO: one JSON line per outcome, to a file",
        ),
    )
}
