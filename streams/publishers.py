"""Outcome publishers, declared so the AsyncAPI document shows every event and where it goes."""

from __future__ import annotations

from dataclasses import dataclass

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
    EmailSent,
    EmailFailed,
    CompletionSucceeded,
    CompletionFailed,
    MessageDeadLettered,
)


DEAD_LETTER_DOC = (
    "Dead letters of `{source}`: the original body, untouched, with headers x-failure-kind "
    "(invalid | exhausted | fatal | poison), x-exception-type, x-exception-message, "
    "x-exception-stacktrace (bounded), x-original-queue, x-attempts, x-first-failure-at, "
    "x-last-failure-at, message-id, correlation-id."
)


RETRY_DOC = (
    "Broker-held retries. A transiently failed command is published here, body untouched, with "
    "header x-attempts (the next attempt), x-first-failure-at, x-last-failure-at, x-exception-type "
    "and x-exception-message. The routing key spells the delay in seconds in binary, one bit per "
    "delay level (`delay.level.15` ... `delay.level.00`, each a queue holding messages 2**k s), "
    "followed by the destination queue; after the last level `delay.deliver` routes it home. "
    "On Redis the same retry waits in sorted set `{<stream>}:retry` (score = due time) and is "
    "moved back into its stream atomically when due."
)


@dataclass(frozen=True, slots=True)
class Publishers:
    """Every publisher the pipeline uses, by role."""

    rabbit_events: dict[str, RabbitPublisher]
    rabbit_dead_letters: dict[str, RabbitPublisher]
    redis_events: RedisPublisher
    redis_dead_letters: dict[str, RedisPublisher]
    rabbit_delay: RabbitPublisher


def declare_publishers(rabbit: RabbitBroker, redis: RedisBroker) -> Publishers:
    """Outcome events per type and dead-letter channels per source, on both brokers."""
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
    rabbit_dead_letters = {
        name: rabbit.publisher(
            queue=topology.dead_letter_queue(name),
            persist=True,
            title=f"{names.dlq(name)}:dead-letter",
            description=DEAD_LETTER_DOC.format(source=name),
            schema=bytes,
        )
        for name in topology.COMMAND_QUEUES
    }
    # Redis dead letters are written with XADD (the entry's fields verbatim plus the failure
    # fields); these publishers document the channels.
    redis_dead_letters = {
        stream: redis.publisher(
            stream=names.dlq(stream),
            title=f"{names.dlq(stream)}:dead-letter:redis",
            description=DEAD_LETTER_DOC.format(source=stream)
            + " The entry keeps the original fields verbatim; the headers are extra fields.",
            schema=bytes,
        )
        for stream, _ in topology.COMMAND_STREAMS
    }
    rabbit_delay = rabbit.publisher(
        exchange=topology.delay_exchange(topology.DELAY_LEVELS - 1),
        persist=True,
        title="delay:retry",
        description=RETRY_DOC,
        schema=bytes,
    )
    return Publishers(rabbit_events, rabbit_dead_letters, redis_events, redis_dead_letters, rabbit_delay)
