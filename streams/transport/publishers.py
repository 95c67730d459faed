"""Outcome publishers, declared so the AsyncAPI document shows every event and where it goes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher.usecase import RabbitPublisher
from faststream.redis import RedisBroker
from faststream.redis.publisher.usecase import StreamPublisher as RedisPublisher

from schemas import Event, MessageDeadLettered, OutcomeEvent
from streams.core import names
from streams.flows.flow import Flow
from streams.transport import topology

DEAD_LETTER_DOC = (
    "Dead letters of `{source}`: the original body, untouched, with headers x-failure-kind "
    "(invalid | exhausted | fatal | poison), x-exception-type, x-exception-message, "
    "x-exception-stacktrace (bounded), x-original-queue, x-attempts, x-first-failure-at, "
    "x-last-failure-at, message-id, correlation-id."
)


@dataclass(frozen=True, slots=True)
class Publishers:
    """Every publisher the pipeline uses, by role."""

    rabbit_events: dict[str, RabbitPublisher]
    rabbit_dead_letters: dict[str, RabbitPublisher]
    redis_events: RedisPublisher
    redis_dead_letters: dict[str, RedisPublisher]
    rabbit_delay: RabbitPublisher


def declare_event_publishers(rabbit: RabbitBroker, events: Iterable[type[Event]]) -> dict[str, RabbitPublisher]:
    """One RabbitMQ publisher an event type, on topic exchange `events` under its type."""
    return {
        cls.TYPE: rabbit.publisher(
            exchange=topology.EVENTS,
            routing_key=cls.TYPE,
            persist=True,
            title=f"events:{cls.TYPE}",
            description=cls.__doc__,
            schema=cls,
        )
        for cls in events
    }


def declare_flow_publishers(rabbit: RabbitBroker, redis: RedisBroker, flow: Flow[Any], publishers: Publishers) -> None:
    """A flow's outcome events and its dead-letter channels, on both brokers, added to `publishers`."""
    publishers.rabbit_events.update(declare_event_publishers(rabbit, flow.outcomes))
    publishers.rabbit_dead_letters[flow.queue] = rabbit.publisher(
        queue=topology.dead_letter_queue(flow.queue),
        persist=True,
        title=f"{names.dlq(flow.queue)}:dead-letter",
        description=DEAD_LETTER_DOC.format(source=flow.queue),
        schema=bytes,
    )
    # Redis dead letters are written with XADD (the entry's fields verbatim plus the failure
    # fields); this publisher documents the channel.
    publishers.redis_dead_letters[flow.stream] = redis.publisher(
        stream=names.dlq(flow.stream),
        title=f"{names.dlq(flow.stream)}:dead-letter:redis",
        description=DEAD_LETTER_DOC.format(source=flow.stream)
        + " The entry keeps the original fields verbatim; the headers are extra fields.",
        schema=bytes,
    )


def declare_publishers(rabbit: RabbitBroker, redis: RedisBroker) -> Publishers:
    """The publishers every flow shares; `declare_flow_publishers` adds each flow's own."""
    return Publishers(
        rabbit_events=declare_event_publishers(rabbit, [MessageDeadLettered]),
        rabbit_dead_letters={},
        redis_events=redis.publisher(
            stream=names.EVENTS_STREAM,
            title="events:redis",
            description="Every outcome event; header `event-type` names it.",
            schema=OutcomeEvent,
        ),
        redis_dead_letters={},
        # Broker-held retries (streams.transport.topology): the worker sends a transiently failed
        # command, body untouched, to the highest delay level under a routing key it computes per
        # message (the delay in seconds in binary, one bit a level, then the destination queue), and
        # the broker routes it back to its command queue when due. No fixed address and nobody else's
        # to publish to or read: left out of the AsyncAPI document, where the command channels it
        # returns to are.
        rabbit_delay=rabbit.publisher(
            exchange=topology.delay_exchange(topology.DELAY_LEVELS - 1),
            persist=True,
            title="delay:retry",
            schema=bytes,
            include_in_schema=False,
        ),
    )
