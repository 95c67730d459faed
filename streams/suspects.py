"""Crash accounting: poison is the message that kills its worker, not every message beside it.

When a worker dies, the broker charges a delivery to every message that worker held: the one
that killed it, the others it was handling, and the prefetched ones it never started. Counting
those deliveries (RabbitMQ `x-delivery-count`, the Redis delivery count) parks innocent
messages as poison whenever a real poison message sits in the same window.

So a redelivered message is a *suspect*: it runs alone in its worker (`Isolation.exclusive`,
while first deliveries run side by side under `Isolation.shared`), and its start is counted in
Redis (`CrashLedger.started`), keyed by the message, its attempt and the replay it belongs to.
A suspect that starts again and again without an outcome is killing its worker by itself; once
the count reaches `delivery_limit` it is dead-lettered as `poison` before its handler runs. A
suspect that ends (handled, retried or dead-lettered) is never charged again: its next
delivery is a new attempt, or it is found in the inbox.

If Redis cannot be reached, the broker's own count decides, as before (safe, less precise).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streams.envelope import Envelope
from streams.logging import get_logger

log = get_logger("pipeline.suspects")

KEY_PREFIX: Final = "pipeline:starts"
TTL_SECONDS: Final = 7 * 24 * 3600  # longer than any retry schedule; the key is useless after


def ledger_key(env: Envelope) -> str:
    """One counter per message, attempt and replay: a retry or a replay starts from zero."""
    replayed_from = env.headers.get("x-replayed-from", "")
    return f"{KEY_PREFIX}:{env.transport}:{env.source}:{env.message_id}:{env.attempt}:{replayed_from}"


class CrashLedger:
    """Counts the starts of redelivered messages, across workers, in Redis."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def started(self, env: Envelope) -> int:
        """Count one more start of this suspect; returns how many there have been, this one included.

        Falls back to the broker's count (deliveries before this one) when Redis does not answer.
        """
        key = ledger_key(env)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, TTL_SECONDS)
                count, _ = await pipe.execute()
            return int(count)
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; the broker's delivery count decides", error=repr(exc))
            return env.redeliveries


class Isolation:
    """A writer-preferring read/write lock: first deliveries share the worker, suspects run alone."""

    def __init__(self) -> None:
        self._readers = 0
        self._writers = 0  # running or waiting
        self._one_writer = asyncio.Lock()
        self._no_readers = asyncio.Event()
        self._no_readers.set()
        self._no_writers = asyncio.Event()
        self._no_writers.set()

    @property
    def exclusive_waiting(self) -> int:
        """Suspects running or waiting to run alone."""
        return self._writers

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Run beside other first deliveries; wait while a suspect runs or waits."""
        while self._writers:
            await self._no_writers.wait()
        self._readers += 1
        self._no_readers.clear()
        try:
            yield
        finally:
            self._readers -= 1
            if not self._readers:
                self._no_readers.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Run alone: after every running message has finished, before any new one starts."""
        self._writers += 1
        self._no_writers.clear()
        try:
            async with self._one_writer:
                await self._no_readers.wait()
                yield
        finally:
            self._writers -= 1
            if not self._writers:
                self._no_writers.set()
