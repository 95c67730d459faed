"""`streams.amqp.publish_confirmed` against the real RabbitMQ: many publishes in one write arrive
as that many `basic_publish` calls would deliver them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiormq
import pytest
from pamqp import commands as spec

from streams.amqp import publish_confirmed
from tests.connected.conftest import RABBIT_URL


@pytest.fixture
async def channel() -> AsyncIterator[aiormq.Channel]:
    conn = await aiormq.connect(RABBIT_URL)
    try:
        ch = await conn.channel(publisher_confirms=True)
        yield ch  # type: ignore[misc]  # aiormq's channel() is typed as its abstract channel
    finally:
        await conn.close()


async def _bound_queue(ch: aiormq.Channel) -> tuple[str, str]:
    exchange = f"test.amqp.{uuid.uuid4().hex[:8]}"
    await ch.exchange_declare(exchange, exchange_type="topic", auto_delete=True)
    declared = await ch.queue_declare("", exclusive=True)
    assert declared.queue is not None
    await ch.queue_bind(declared.queue, exchange, routing_key="#")
    return exchange, declared.queue


async def _get(ch: aiormq.Channel, queue: str, n: int) -> list[aiormq.abc.DeliveredMessage]:
    got: list[aiormq.abc.DeliveredMessage] = []
    async with asyncio.timeout(10):
        while len(got) < n:
            message = await ch.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty: not routed yet
                await asyncio.sleep(0.01)
                continue
            got.append(message)
    return got


async def test_many_messages_arrive_in_order_with_their_properties(channel: aiormq.Channel) -> None:
    """200 messages in one call: all confirmed, delivered in order, routing keys, ids and headers kept;
    the next publishes on the channel (either way) are numbered after them."""
    exchange, queue = await _bound_queue(channel)
    messages = [
        (
            f"email.{i % 3}",
            f'{{"n": {i}}}'.encode(),
            spec.Basic.Properties(
                delivery_mode=2, message_id=f"ev-{i}", correlation_id=f"c-{i}", headers={"event-type": f"email.{i % 3}"}
            ),
        )
        for i in range(200)
    ]
    await publish_confirmed(channel, exchange, messages)
    await publish_confirmed(channel, exchange, messages[:5])
    confirm = await channel.basic_publish(b"after", exchange=exchange, routing_key="x")
    assert isinstance(confirm, spec.Basic.Ack)
    got = await _get(channel, queue, 206)
    assert [m.body for m in got[:200]] == [body for _, body, _ in messages]
    assert [m.routing_key for m in got[:200]] == [key for key, _, _ in messages]
    assert [m.header.properties.message_id for m in got[:3]] == ["ev-0", "ev-1", "ev-2"]
    assert got[7].header.properties.correlation_id == "c-7"
    assert got[7].header.properties.headers == {"event-type": "email.1"}
    assert got[-1].body == b"after"


async def test_a_body_larger_than_a_frame_arrives_whole(channel: aiormq.Channel) -> None:
    """A body past the negotiated frame size goes out in several body frames, and arrives intact."""
    exchange, queue = await _bound_queue(channel)
    big = bytes(range(256)) * 2048  # 512 KiB, past the default 128 KiB frame_max
    await publish_confirmed(
        channel, exchange, [("big", big, spec.Basic.Properties()), ("small", b"s", spec.Basic.Properties())]
    )
    got = await _get(channel, queue, 2)
    assert [m.body for m in got] == [big, b"s"]


async def test_a_channel_without_confirms_is_refused() -> None:
    """Without publisher confirms nothing could be awaited: refused before anything is sent."""
    conn = await aiormq.connect(RABBIT_URL)
    try:
        ch = await conn.channel(publisher_confirms=False)
        with pytest.raises(ValueError, match="publisher confirms"):
            await publish_confirmed(ch, "", [("q", b"x", spec.Basic.Properties())])  # type: ignore[arg-type]
    finally:
        await conn.close()


async def test_a_publish_to_a_missing_exchange_raises_and_the_channel_is_not_left_waiting(
    channel: aiormq.Channel,
) -> None:
    """The broker closes the channel (404): the call raises instead of waiting for confirms forever."""
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        async with asyncio.timeout(10):
            await publish_confirmed(channel, f"missing.{uuid.uuid4().hex}", [("k", b"x", spec.Basic.Properties())])
