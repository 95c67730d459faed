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
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Final, TypeVar, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from streams.committer import GroupCommitter
from streams.envelope import Envelope
from streams.logging import get_logger
from streams.resp import PackedConnection, bulk

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

T = TypeVar("T")


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
        # Concurrent messages share one round trip each way, as their commits share a transaction;
        # each way on a connection of its own (one call at a time: the committer's writer).
        self._starts: GroupCommitter[str, None] = GroupCommitter(self._count_starts, max_batch=512)
        self._ends: GroupCommitter[str, None] = GroupCommitter(self._count_returns, max_batch=512)
        self._start_calls = _ScriptCalls(self._count)
        self._end_calls = _ScriptCalls(self._count)
        self._turn_calls = _ScriptCalls(self._count)

    def start(self) -> None:
        """Share round trips between concurrent messages (on the running loop)."""
        self._starts.start()
        self._ends.start()

    async def stop(self) -> None:
        """Send what is queued, then write each update alone."""
        await self._starts.stop()
        await self._ends.stop()
        await self._start_calls.close()
        await self._end_calls.close()
        await self._turn_calls.close()

    async def _count_starts(self, keys: Sequence[str]) -> list[None]:
        # One command for the lot: a script over every key (a pipeline packs two commands a key).
        await self._start_calls(keys, TTL_SECONDS, 0)
        return [None] * len(keys)

    async def _count_returns(self, keys: Sequence[str]) -> list[None]:
        await self._end_calls(keys, TTL_SECONDS, len(keys))
        return [None] * len(keys)

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
            await self._starts.submit(ledger_key(env))
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; this run is not counted", error=repr(exc))

    async def handler_returned(self, env: Envelope) -> None:
        """The handler returned or raised: this run was no crash (a counter back at zero is deleted).

        While Redis does not answer (a restart), the decrement is retried in the background, so a
        run that ended well is not left counted as a crash.
        """
        key = ledger_key(env)
        try:
            await self._ends.submit(key)
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; the run is uncounted once it is back", error=repr(exc))
            self._retry_returned_later([key])

    async def turn(self, ended: Sequence[str], started: Sequence[str]) -> None:
        """Count down the runs that `ended` and count up those `started` next, in one round trip.

        While Redis does not answer, the runs starting are not counted (logged) and the count-downs
        are retried in the background, as `handler_started` and `handler_returned` do.
        """
        if not ended and not started:
            return
        try:
            await self._turn_calls([*ended, *started], TTL_SECONDS, len(ended))
        except (RedisError, OSError) as exc:
            log.warning("crash ledger unavailable; these runs are not counted", starting=len(started), error=repr(exc))
            if ended:
                self._retry_returned_later(ended)

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


async def run_counted(
    ledger: CrashLedger | None, runs: Sequence[tuple[str, Callable[[], Coroutine[Any, Any, T]]]], at_once: int
) -> list[T | BaseException]:
    """Each run (ledger key, coroutine function) as a task, at most `at_once` at a time, each counted
    in the ledger from just before it starts until just after it ends; results (or what each raised) in order.

    A turn is one ledger call: the runs that ended since the last one are counted down and the next
    ones up together, and those start once it has returned. So a crash charges at most `at_once`
    runs (those counted at that moment), a run starts counted whenever Redis answers, a run that
    ends frees its place for the next at the next turn (a slow run holds up no other), and every run
    is counted down before this returns, cancelled or not. One call a turn, not two calls and two
    futures a run: the handlers of a batch that arrived together start after one round trip.
    """
    results: list[T | BaseException] = [asyncio.CancelledError()] * len(runs)
    loop = asyncio.get_running_loop()
    running: dict[asyncio.Task[T], int] = {}
    ended: list[int] = []
    wake: list[asyncio.Future[None]] = []  # the runner's, while it waits for a run to end

    def finished(task: asyncio.Task[T]) -> None:
        i = running.pop(task)
        if task.cancelled():
            results[i] = asyncio.CancelledError()
        else:
            error = task.exception()
            results[i] = task.result() if error is None else error
        ended.append(i)
        if wake and not wake[0].done():
            wake[0].set_result(None)

    following = 0  # the next run to start
    try:
        while True:
            starting = range(following, min(len(runs), following + at_once - len(running)))
            following = starting.stop
            done = ended[:]
            ended.clear()
            if ledger is not None:
                try:
                    await ledger.turn([runs[i][0] for i in done], [runs[i][0] for i in starting])
                except BaseException:
                    # Cancelled in the call: it may or may not have counted; count all of them down
                    # (a run that never started has a count of 0 or 1: down to none either way).
                    ended[:0] = [*done, *starting]
                    raise
            for i in starting:
                task = loop.create_task(runs[i][1]())
                running[task] = i
                task.add_done_callback(finished)
            if not running and not ended and following == len(runs):
                return results
            if not ended:
                wake.append(loop.create_future())
                try:
                    await wake[0]
                finally:
                    wake.clear()
    finally:
        if running:  # cancelled: stop the runs, then count them down
            left = list(running)
            for run in left:
                run.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        if ended and ledger is not None:
            await ledger.turn([runs[i][0] for i in ended], [])


class _ScriptCalls:
    """EVALSHA of one script on a connection of its own (`PackedConnection`), packed here.

    A call through the client (`Script.__call__`) takes a connection from the pool and gives it
    back (a lock, observability hooks, a health check), and packs every argument generically:
    215-257 -> 123-138 us of CPU a call of 16 keys side by side, and the ledger makes two calls
    for every 16 handlers. A script Redis does not know (it restarted: it keeps no scripts) is
    loaded and the call made once more.
    """

    def __init__(self, script: AsyncScript) -> None:
        self.script = script
        self._connection: PackedConnection | None = None  # made on first use
        self._head = b"*%d\r\n$7\r\nEVALSHA\r\n"

    async def __call__(self, keys: Sequence[str], *args: int) -> Any:
        try:
            return await self._call(keys, args)
        except NoScriptError:
            await self.script.registered_client.script_load(self.script.script)
            return await self._call(keys, args)

    async def _call(self, keys: Sequence[str], args: tuple[int, ...]) -> Any:
        parts = [self._head % (3 + len(keys) + len(args)), bulk(self.script.sha.encode()), bulk(b"%d" % len(keys))]
        parts += [bulk(key.encode()) for key in keys]
        parts += [bulk(b"%d" % arg) for arg in args]
        if self._connection is None:
            self._connection = PackedConnection(cast(aioredis.Redis, self.script.registered_client))
        (answer,) = await self._connection.exchange(b"".join(parts), 1)
        return answer

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


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
