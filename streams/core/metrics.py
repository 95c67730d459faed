"""Prometheus metrics: FastStream's own per broker, plus `pipeline_*`; one registry serves them all."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_PUBLISHED = Counter(
    "pipeline_events_published",
    "Outcome events published, by broker and event type.",
    ["broker", "event_type"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "pipeline_dead_letters",
    "Messages dead-lettered, by broker, source queue or stream, and failure kind.",
    ["broker", "queue", "kind"],
    registry=REGISTRY,
)
RETRIES_SCHEDULED = Counter(
    "pipeline_retries_scheduled",
    "Failed attempts handed back to the broker for a delayed retry.",
    ["broker", "queue"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "pipeline_duplicates_skipped",
    "Messages whose outcome was already committed (redelivered or re-published): no second effect.",
    ["broker", "queue"],
    registry=REGISTRY,
)
GROUPS_RECREATED = Counter(
    "pipeline_redis_groups_recreated",
    "Redis consumer groups re-created after they were lost (a Redis restart without persistence).",
    ["stream", "group"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "pipeline_breaker_state",
    "Circuit breaker per dependency: 0 closed, 1 half-open, 2 open.",
    ["dependency"],
    registry=REGISTRY,
)
OUTBOX_BACKLOG = Gauge("pipeline_outbox_backlog", "Outcome events committed but not yet published.", registry=REGISTRY)
OUTBOX_AGE = Gauge(
    "pipeline_outbox_oldest_age_seconds", "Age of the oldest unpublished outcome event.", registry=REGISTRY
)
QUEUE_DEPTH = Gauge(
    "pipeline_queue_depth", "Messages ready in a command queue (RabbitMQ).", ["broker", "queue"], registry=REGISTRY
)
STREAM_LAG = Gauge(
    "pipeline_stream_lag",
    "Entries of a command stream not yet delivered to its group, plus pending ones (Redis).",
    ["stream", "group"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("pipeline_in_flight", "Messages being handled now.", ["broker", "queue"], registry=REGISTRY)
END_TO_END = Histogram(
    "pipeline_end_to_end_latency_seconds",
    "From the command's publish time (AMQP timestamp / stream entry id) to its committed outcome.",
    ["broker", "flow"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)
DEPENDENCY_WAIT = Histogram(
    "pipeline_dependency_wait_seconds",
    "Time a call waited for its dependency's limits (concurrency, rate, tokens, pushback).",
    ["dependency"],
    buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
THROTTLED = Counter(
    "pipeline_throttled_total",
    "Calls a dependency answered with 429 or 503 and Retry-After (the message waits, no attempt used).",
    ["dependency"],
    registry=REGISTRY,
)
DEPENDENCY_IN_FLIGHT = Gauge(
    "pipeline_dependency_in_flight",
    "Calls to a dependency running now in this worker.",
    ["dependency"],
    registry=REGISTRY,
)
STORE_BATCH = Histogram(
    "pipeline_store_batch_size",
    "Messages per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
