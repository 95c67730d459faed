"""Outcome publishers, declared so the AsyncAPI document shows every event and where it goes."""

from __future__ import annotations

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher.usecase import RabbitPublisher
from faststream.redis import RedisBroker
from faststream.redis.publisher.usecase import StreamPublisher as RedisPublisher

from schemas import (
    CompletionFailed,
    CompletionSucceeded,
    EmailFailed,
    EmailSent,
    Event,
    MessageDeadLettered,
    OutcomeEvent,
)
from streams import names, topology

EVENT_TYPES: tuple[type[Event], ...] = (
    EmailSent, EmailFailed, CompletionSucceeded, CompletionFailed, MessageDeadLettered,
)


def declare_publishers(rabbit: RabbitBroker, redis: RedisBroker) -> tuple[dict[str, RabbitPublisher], RedisPublisher]:
    """One RabbitMQ publisher per event type (its routing key), one Redis publisher for stream `events`."""
    rabbit_events = {
        cls.TYPE: rabbit.publisher(
            exchange=topology.EVENTS,
            routing_key=cls.TYPE,
            persist=True,
            title=f"events:{cls.TYPE}",
            description=cls.__doc__,
            schema=cls,
        )
        for cls in EVENT_TYPES
    }
    redis_events = redis.publisher(
        stream=names.EVENTS_STREAM,
        title="events:redis",
        description="Every outcome event; header `event-type` names it.",
        schema=OutcomeEvent,
    )
    return rabbit_events, redis_events
