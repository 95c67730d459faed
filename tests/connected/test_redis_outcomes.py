"""The relay's outcome XADDs on the local Redis: in order, in FastStream's envelope, through one redis-py pipeline."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from redis.exceptions import ResponseError

from streams.core import names
from streams.eventstore.store import PendingEvent
from streams.transport.outlets import RedisOutlet, ascii_header


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
            "correlation_id": ascii_header(row.correlation_id),
            "content-type": "application/json",
            names.H_EVENT_TYPE: "email.sent",
            names.H_MESSAGE_ID: ascii_header(row.message_id),
            "message_id": row.event_id,
        }
    # FastStream's envelope keeps only ASCII header values intact: the others arrive escaped.
    assert published[1][1][names.H_MESSAGE_ID] == "m-\\xe9\\U0001f4a9"


async def test_an_error_reply_fails_the_call_and_the_next_one_goes_out(
    redis_client: aioredis.Redis, outlet: RedisOutlet
) -> None:
    await redis_client.set(outlet.events_stream, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await outlet.publish_events([_row(1), _row(2)])
    await redis_client.delete(outlet.events_stream)
    await outlet.publish_events([_row(3)])
    assert [body for body, _ in await _published(redis_client, outlet.events_stream)] == [_row(3).payload]
