"""The relay's outcome XADDs on the local Redis: in order, FastStream's envelope, on the outlet's own connection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streams import names
from streams.outlets import RedisOutlet
from streams.store import PendingEvent


@pytest.fixture
async def outlet(redis_client: aioredis.Redis) -> AsyncIterator[RedisOutlet]:
    outlet = RedisOutlet(cast(Any, None), redis_client, {}, stream=f"outcomes-{uuid.uuid4().hex[:8]}")
    try:
        yield outlet
    finally:
        await outlet.close()
        await redis_client.delete(outlet.events_stream)


def _row(n: int, message_id: str | None = None) -> PendingEvent:
    mid = message_id or f"m-{n}"
    return PendingEvent(n, f"ev-{n}", "redis", "email.sent", b'{"n": %d}' % n, mid, f"c-{mid}")


async def _published(redis_client: aioredis.Redis, stream: str) -> list[tuple[bytes, dict[str, Any]]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis_client.xrange(stream))
    return [BinaryMessageFormatV1.parse(fields[b"__data__"]) for _, fields in entries]


async def test_events_go_out_in_order_in_faststreams_envelope(
    redis_client: aioredis.Redis, outlet: RedisOutlet
) -> None:
    rows = [_row(1), _row(2, "m-\u00e9\U0001f4a9"), _row(3)]  # a producer's id need not be ASCII
    await outlet.publish_events(rows)
    published = await _published(redis_client, outlet.events_stream)
    assert [body for body, _ in published] == [r.payload for r in rows]
    for (_, headers), row in zip(published, rows, strict=True):
        assert headers == {
            "correlation_id": row.correlation_id,
            "content-type": "application/json",
            names.H_EVENT_TYPE: "email.sent",
            names.H_MESSAGE_ID: row.message_id,
            "message_id": row.event_id,
        }


async def test_an_error_reply_fails_the_call_and_the_next_one_goes_out(
    redis_client: aioredis.Redis, outlet: RedisOutlet
) -> None:
    await redis_client.set(outlet.events_stream, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await outlet.publish_events([_row(1), _row(2)])  # both replies read: the connection stays in step
    await redis_client.delete(outlet.events_stream)
    await outlet.publish_events([_row(3)])
    assert [body for body, _ in await _published(redis_client, outlet.events_stream)] == [_row(3).payload]


async def test_a_dropped_connection_fails_one_call_and_the_next_reconnects(
    redis_client: aioredis.Redis, outlet: RedisOutlet
) -> None:
    await outlet.publish_events([_row(1)])
    assert outlet._xadds is not None
    connection = outlet._xadds._connection
    assert connection is not None
    host, port = connection._writer.get_extra_info("sockname")[:2]  # type: ignore[union-attr]
    assert await redis_client.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
    with pytest.raises((RedisConnectionError, ConnectionError, OSError)):
        await outlet.publish_events([_row(2)])  # the relay keeps such rows and publishes them again
    await outlet.publish_events([_row(3)])
    bodies = [body for body, _ in await _published(redis_client, outlet.events_stream)]
    assert bodies[0] == _row(1).payload
    assert bodies[-1] == _row(3).payload
