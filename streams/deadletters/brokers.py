"""The brokers' side of dead letters: replaying onto RabbitMQ and Redis, and their `.dlq` queues."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streams.core.settings import mask_url
from streams.deadletters.model import BrokerError, DeadLetter, DeadLetterError, reason
from streams.deadletters.replays import Publish, rabbit_replay, redis_entry


class BrokerPublisher:
    """Replays dead letters on the real brokers; connects to each one the first time it is needed."""

    def __init__(self, rabbit_url: str, redis_url: str, timeout: float) -> None:
        self.rabbit_url = rabbit_url
        self.redis_url = redis_url
        self.timeout = timeout
        self._rabbit: Any = None  # aio_pika connection
        self._channel: Any = None
        self._redis: aioredis.Redis | None = None

    async def __call__(self, letter: DeadLetter) -> str:
        """Publish one dead letter where it first arrived; returns where that is."""
        if letter.transport == "rabbit":
            return await self._publish_rabbit(letter)
        if letter.transport == "redis":
            return await self._publish_redis(letter)
        raise DeadLetterError(f"dead letter {letter.id} has an unknown transport {letter.transport!r}")

    async def _publish_rabbit(self, letter: DeadLetter) -> str:
        msg = rabbit_replay(letter)
        where = f"RabbitMQ queue {msg.routing_key!r}"
        try:
            channel = await self._rabbit_channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    msg.body,
                    headers=msg.headers,
                    content_type=msg.content_type,
                    message_id=msg.message_id,
                    correlation_id=msg.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=msg.routing_key,
                mandatory=True,
                timeout=self.timeout,
            )
        except aiormq.exceptions.PublishError as exc:  # basic.return: no such queue
            raise BrokerError(f"RabbitMQ returned dead letter {letter.id}: there is no queue {letter.queue!r}") from exc
        except TimeoutError as exc:
            raise BrokerError(
                f"no confirm from RabbitMQ for dead letter {letter.id} within {self.timeout:g}s; "
                "it may have arrived anyway, it is not marked replayed"
            ) from exc
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError) as exc:
            raise BrokerError(f"cannot replay dead letter {letter.id} to {where}: {reason(exc)}") from exc
        return where

    async def _rabbit_channel(self) -> Any:
        if self._channel is None:
            try:
                self._rabbit = await aio_pika.connect(self.rabbit_url, timeout=self.timeout)
                # Confirms on: a publish returns once RabbitMQ has the message; a returned one raises.
                self._channel = await self._rabbit.channel(publisher_confirms=True, on_return_raises=True)
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                raise BrokerError(f"cannot connect to RabbitMQ at {mask_url(self.rabbit_url)}: {reason(exc)}") from exc
        return self._channel

    async def _publish_redis(self, letter: DeadLetter) -> str:
        entry = await redis_entry(letter)
        where = f"Redis stream {letter.queue!r}"
        if self._redis is None:
            self._redis = aioredis.from_url(
                self.redis_url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout
            )
        try:
            entry_id = await self._redis.xadd(letter.queue, entry)  # type: ignore[arg-type]
        except (RedisError, OSError, TimeoutError) as exc:
            shown = mask_url(self.redis_url)
            raise BrokerError(f"cannot replay dead letter {letter.id} to {where} at {shown}: {reason(exc)}") from exc
        entry_text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return f"{where} (entry {entry_text})"

    async def close(self) -> None:
        """Close whatever connections were opened."""
        if self._rabbit is not None:
            await self._rabbit.close()
        if self._redis is not None:
            await self._redis.aclose()


@asynccontextmanager
async def broker_publisher(rabbit_url: str, redis_url: str, io_timeout: float) -> AsyncIterator[Publish]:
    """A `Publish` on the real brokers, closed afterwards."""
    publisher = BrokerPublisher(rabbit_url, redis_url, io_timeout)
    try:
        yield publisher
    finally:
        await publisher.close()


async def broker_dlqs(
    targets: Sequence[tuple[str, str]], rabbit_url: str, redis_url: str, io_timeout: float, *, purge: bool
) -> dict[tuple[str, str], int | None]:
    """Messages in each (transport, dead-letter queue or stream); None when it does not exist.

    With `purge`, each one is emptied and the count is how many messages it lost.
    """
    result: dict[tuple[str, str], int | None] = {}
    rabbit = [name for transport, name in targets if transport == "rabbit"]
    if rabbit:
        sizes = await _rabbit_dlqs(rabbit, rabbit_url, io_timeout, purge)
        result.update({("rabbit", k): v for k, v in sizes.items()})
    streams = [name for transport, name in targets if transport == "redis"]
    if streams:
        sizes = await _redis_dlqs(streams, redis_url, io_timeout, purge)
        result.update({("redis", k): v for k, v in sizes.items()})
    return result


async def _rabbit_dlqs(queues: Sequence[str], url: str, io_timeout: float, purge: bool) -> dict[str, int | None]:
    sizes: dict[str, int | None] = {}
    try:
        async with await aio_pika.connect(url, timeout=io_timeout) as conn:
            for name in queues:
                # A passive declare of a missing queue closes its channel: one channel per queue.
                async with await conn.channel() as channel:
                    try:
                        queue = await channel.declare_queue(name, passive=True, timeout=io_timeout)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        sizes[name] = None
                        continue
                    if purge:
                        sizes[name] = (await queue.purge(timeout=io_timeout)).message_count or 0
                    else:
                        sizes[name] = queue.declaration_result.message_count or 0
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise BrokerError(f"cannot reach RabbitMQ at {mask_url(url)}: {reason(exc)}") from exc
    return sizes


async def _redis_dlqs(streams: Sequence[str], url: str, io_timeout: float, purge: bool) -> dict[str, int | None]:
    client = aioredis.from_url(url, socket_connect_timeout=io_timeout, socket_timeout=io_timeout)
    sizes: dict[str, int | None] = {}
    try:
        for name in streams:
            if not await client.exists(name):
                sizes[name] = None
            elif purge:
                sizes[name] = int(await client.xtrim(name, maxlen=0, approximate=False))
            else:
                sizes[name] = int(await client.xlen(name))
    except (RedisError, OSError, TimeoutError) as exc:
        raise BrokerError(f"cannot reach Redis at {mask_url(url)}: {reason(exc)}") from exc
    finally:
        await client.aclose()
    return sizes
