"""The whole broker topology, declared at start-up so producers can publish as soon as we are ready.

RabbitMQ retries wait in TTL + dead-letter-exchange delay queues, no plugin: one quorum queue
per power-of-two level (level k holds a message 2**k seconds). A delay of d seconds is written
in binary into the routing key, one bit per level from the highest, followed by the destination
queue; each level's exchange sends the message through its queue when its bit is 1 and past it
when 0, and the last level hands it to `delay.deliver`, which routes it home. Every level queue
has one fixed TTL, so a long delay never waits behind a short one (the NServiceBus layout).
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis
from faststream.rabbit import ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue
from redis.exceptions import ResponseError

from streams.core import names
from streams.flows.catalog import FLOWS

# The broker's own poison cap, a backstop behind the worker's crash ledger and its
# PIPELINE_DELIVERY_LIMIT (which dead-letter with the whole story first). High, because the
# broker charges a delivery to every message a dying worker held, not only the one that killed
# it: under a crash loop, innocent messages in the prefetch window pile up deliveries fast.
# Fixed, so changing the setting never needs the queues re-declared.
BROKER_DELIVERY_LIMIT = 100
DELAY_LEVELS = 16  # the longest delay is 2**16 - 1 s, about 18 h
DELAY_DELIVER = "delay.deliver"

TASKS = RabbitExchange(names.TASKS_EXCHANGE, type=ExchangeType.DIRECT, durable=True)
EVENTS = RabbitExchange(names.EVENTS_EXCHANGE, type=ExchangeType.TOPIC, durable=True)

COMMAND_QUEUES = tuple(flow.queue for flow in FLOWS)
COMMAND_STREAMS = tuple((flow.stream, flow.group) for flow in FLOWS)


def command_queue(name: str) -> RabbitQueue:
    """A command's quorum queue: a worker crash counts as a delivery; past the limit it dead-letters."""
    return RabbitQueue(
        name,
        queue_type=QueueType.QUORUM,
        durable=True,
        routing_key=name,
        arguments={
            "x-delivery-limit": BROKER_DELIVERY_LIMIT,
            # Backstop only: the worker itself dead-letters with the full story before this.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.dlq(name),
        },
    )


def dead_letter_queue(name: str) -> RabbitQueue:
    """The durable queue that parks a command queue's dead letters."""
    return RabbitQueue(names.dlq(name), queue_type=QueueType.QUORUM, durable=True)


def delay_exchange(level: int) -> RabbitExchange:
    """The topic exchange in front of delay level `level`."""
    return RabbitExchange(f"delay.level.{level:02d}", type=ExchangeType.TOPIC, durable=True)


def _next_hop(level: int) -> str:
    return delay_exchange(level - 1).name if level > 0 else DELAY_DELIVER


def delay_queue(level: int) -> RabbitQueue:
    """Level `level`: holds every message for exactly 2**level seconds, then passes it on."""
    return RabbitQueue(
        f"delay.level.{level:02d}",
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments={
            "x-message-ttl": (2**level) * 1000,
            "x-dead-letter-exchange": _next_hop(level),
            # A classic queue dead-letters at most once: a broker stopping while a message passes
            # from one level to the next loses it. A quorum queue keeps the message until the next
            # hop has it (needs reject-publish overflow).
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def delay_routing_key(delay_seconds: float, destination: str) -> str:
    """The routing key that delays a message by `delay_seconds` (rounded up) then sends it home."""
    seconds = min(max(math.ceil(delay_seconds), 0), 2**DELAY_LEVELS - 1)
    bits = format(seconds, f"0{DELAY_LEVELS}b")
    return ".".join(bits) + "." + destination


def _skip(level: int) -> str:
    return "*." * (DELAY_LEVELS - 1 - level)


async def declare_rabbit(broker: RabbitBroker) -> None:
    """Declare exchanges, command, dead-letter and delay queues, and their bindings (idempotent)."""
    tasks = await broker.declare_exchange(TASKS)
    await broker.declare_exchange(EVENTS)
    deliver = await broker.declare_exchange(RabbitExchange(DELAY_DELIVER, type=ExchangeType.TOPIC, durable=True))
    for name in COMMAND_QUEUES:
        queue = await broker.declare_queue(command_queue(name))
        await queue.bind(tasks, routing_key=name)
        await queue.bind(deliver, routing_key="*." * DELAY_LEVELS + name)
        await broker.declare_queue(dead_letter_queue(name))
    for level in range(DELAY_LEVELS):
        exchange = await broker.declare_exchange(delay_exchange(level))
        queue = await broker.declare_queue(delay_queue(level))
        await queue.bind(exchange, routing_key=_skip(level) + "1.#")
        hop = deliver if level == 0 else await broker.declare_exchange(delay_exchange(level - 1))
        await hop.bind(exchange, routing_key=_skip(level) + "0.#")


async def declare_redis(client: aioredis.Redis) -> None:
    """Create each command stream with its consumer group, reading from the start (idempotent)."""
    for stream, group in COMMAND_STREAMS:
        try:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
