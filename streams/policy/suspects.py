"""Crash accounting: poison is the message that kills its worker, not every message beside it.

When a worker dies, the broker charges a delivery to every message that worker held: the one
that killed it, the others it was handling, and the prefetched ones it never started. Counting
those deliveries (RabbitMQ `x-delivery-count`, the Redis delivery count) parks innocent
messages as poison whenever a real poison message sits in the same window.

So every run of a handler is counted in Redis (`CrashLedger`), keyed by the message, its attempt
and the replay it belongs to: one up just before the handler starts, one down when it returns or
raises. What is left on the counter is how many times the worker died inside this message's own
handler; a crash while it waited for the breaker, or after it (commit, ack, relay), is not
charged to it. A redelivered message with a count is a *suspect*: it runs alone in its worker
(`Isolation.exclusive`, while the rest run side by side under `Isolation.shared`), so that if it
kills the worker again, it alone is charged. Once the count reaches `delivery_limit`, the next
delivery is dead-lettered as `poison` before it is handled. A redelivered message without a
count (prefetched, never started) runs as usual.

While Redis cannot be reached nothing is called poison by the ledger; the broker's backstop
(`topology.BROKER_DELIVERY_LIMIT` deliveries) still parks a message that keeps killing its
worker, as it does one that dies before its handler starts (while being decoded).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streams.core.committer import GroupCommitter
from streams.core.envelope import Envelope
from streams.core.logging import get_logger

log = get_logger("pipeline.suspects")

KEY_PREFIX: Final = "pipeline:starts"
RETRY_FIRST: Final = 0.2  # seconds before the first retry of a decrement Redis refused
RETRY_FOR: Final = 120.0  # and how long to keep trying (a Redis restart takes seconds)
TTL_SECONDS: Final = 7 * 24 * 3600  # longer than any retry schedule; the key is useless after
# The first ARGV[2] keys ended their runs (down; a counter back at zero is deleted), the rest
# start theirs (up, expiring after ARGV[1] seconds): every count goes through this one script.
_COUNT: Final = """
local ended = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if i <= ended then
    local n = redis.call('DECR', key)
    if n <= 0 then redis.call('DEL', key) end
  else
    redis.call('INCR', key)
    redis.call('EXPIRE', key, ARGV[1])
  end
end
return #KEYS
"""


def ledger_key(env: Envelope) -> str:
    """One counter per message, attempt and replay: a retry or a replay starts from zero."""
    replayed_from = env.headers.get("x-replayed-from", "")
    return f"{KEY_PREFIX}:{env.transport}:{env.source}:{env.message_id}:{env.attempt}:{replayed_from}"


class CrashLedger:
    """Counts, across workers, the runs of a message's handler that never returned."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        # Every message passes here: only the counters of crashed runs may stay behind.
        self._count = client.register_script(_COUNT)
        self._retries: set[asyncio.Task[None]] = set()
        # Concurrent messages share one round trip, starts and ends together, as their commits share
        # a transaction (redis-py's Script: EVALSHA, loaded again after a Redis restart).
        self._counts: GroupCommitter[tuple[str, bool], None] = GroupCommitter(self._count_runs, max_batch=512)

    def start(self) -> None:
        """Share round trips between concurrent messages (on the running loop)."""
        self._counts.start()

    async def stop(self) -> None:
        """Send what is queued, then write each update alone."""
        await self._counts.stop()

    async def _count_runs(self, units: Sequence[tuple[str, bool]]) -> list[None]:
        # One command for the lot: a script over every key (a pipeline packs two commands a key),
        # the runs that ended first.
        ended = [key for key, end in units if end]
        started = [key for key, end in units if not end]
        await self._count(keys=ended + started, args=[TTL_SECONDS, len(ended)])
        return [None] * len(units)

    async def crashes(self, env: Envelope) -> int:
        """How many times a worker died inside this message's handler; 0 while Redis does not answer.

        Without the ledger a suspect is not called poison: the broker's count charges innocent
        neighbours too, so only the broker's backstop (`topology.BROKER_DELIVERY_LIMIT`) caps it.
        """
        try:
            raw = await self.client.get(ledger_key(env))
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; only the broker's backstop caps this message", error=repr(exc))
            return 0
        return int(raw or 0)

    async def handler_started(self, env: Envelope) -> None:
        """Count a run of this message's handler as a crash until `handler_returned` says otherwise."""
        try:
            await self._counts.submit((ledger_key(env), False))
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; this run is not counted", error=repr(exc))

    async def handler_returned(self, env: Envelope) -> None:
        """The handler returned or raised: this run was no crash (a counter back at zero is deleted).

        While Redis does not answer (a restart), the decrement is retried in the background, so a
        run that ended well is not left counted as a crash.
        """
        key = ledger_key(env)
        try:
            await self._counts.submit((key, True))
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; the run is uncounted once it is back", error=repr(exc))
            self._retry_returned_later([key])

    def _retry_returned_later(self, keys: Sequence[str]) -> None:
        task = asyncio.get_running_loop().create_task(self._retry_returned(list(keys)))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry_returned(self, keys: list[str]) -> None:
        delay = RETRY_FIRST
        deadline = asyncio.get_running_loop().time() + RETRY_FOR
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(delay)
            try:
                await self._count(keys=keys, args=[TTL_SECONDS, len(keys)])
                return
            except (RedisError, OSError):
                delay = min(delay * 2, 5.0)
        log.warning("crash ledger still unavailable; runs that ended stay counted", keys=keys)


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
