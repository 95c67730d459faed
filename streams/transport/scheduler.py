"""Redis retries held by Redis: a sorted set of due times and a mover that puts due entries back.

Per stream S, `{S}:retry` is a sorted set of retry ids scored by due time (ms), and
`{S}:retry:<id>` a hash holding the entry's fields. Scheduling (HSET + ZADD + XACK of the
original) is one MULTI; moving (XADD back into S + DEL + ZREM) is one Lua script, so an entry is
never lost nor moved twice, whatever process dies when. The `{S}` hash tag keeps all of it in
the stream's own cluster slot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from streams.core.periodic import Periodic

MOVE_BATCH = 100

_MOVE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local key = ARGV[3] .. id
  local fields = redis.call('HGETALL', key)
  if #fields > 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


def schedule_key(stream: str) -> str:
    """The sorted set of a stream's scheduled retries."""
    return f"{{{stream}}}:retry"


def entry_key(stream: str, retry_id: str) -> str:
    """The hash holding one scheduled entry's fields."""
    return f"{schedule_key(stream)}:{retry_id}"


async def schedule(
    client: aioredis.Redis,
    stream: str,
    fields: dict[bytes, bytes],
    due_ms: int,
    ack: Callable[[Any], None] | None = None,
) -> str:
    """Schedule `fields` to be added to `stream` at `due_ms`; `ack` adds the original's XACK to the MULTI."""
    retry_id = uuid.uuid4().hex
    async with client.pipeline(transaction=True) as tx:
        tx.hset(entry_key(stream, retry_id), mapping=fields)  # type: ignore[arg-type]
        tx.zadd(schedule_key(stream), {retry_id: due_ms})
        if ack is not None:
            ack(tx)
        await tx.execute()
    return retry_id


async def move_due(client: aioredis.Redis, stream: str, now_ms: int | None = None) -> int:
    """Move every due entry back into its stream, atomically; returns how many moved."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    moved = await client.eval(
        _MOVE_DUE, 2, schedule_key(stream), stream, str(now), str(MOVE_BATCH), schedule_key(stream) + ":"
    )
    return int(moved)


async def pending(client: aioredis.Redis, stream: str) -> int:
    """How many retries of `stream` wait in the scheduled set."""
    return int(await client.zcard(schedule_key(stream)))


class Mover(Periodic):
    """Moves due retries back into their streams every `interval` seconds; stopping loses nothing."""

    name = "redis-retry-mover"

    def __init__(self, client: aioredis.Redis, streams: Sequence[str], interval: float) -> None:
        super().__init__(interval)
        self.client = client
        self.streams = tuple(streams)

    async def tick(self) -> None:
        for stream in self.streams:
            while await move_due(self.client, stream) == MOVE_BATCH:
                pass
