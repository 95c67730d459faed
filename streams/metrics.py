"""Prometheus metrics: FastStream's own per broker, plus `pipeline_*`; one registry serves them all."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

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


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
