"""The relay's outcome publishes on the real RabbitMQ: confirmed, in order, persistent, with their ids;
a publish the broker refuses fails the call, and the outlet's next call goes out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from streams.core import names
from streams.eventstore.store import PendingEvent
from streams.transport.outlets import RabbitOutlet
from tests.connected.conftest import RABBIT_URL


@pytest.fixture
async def channel() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect_robust(RABBIT_URL)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


def _row(n: int) -> PendingEvent:
    return PendingEvent(n, f"ev-{n}", "rabbit", f"email.{n % 3}", b'{"n": %d}' % n, f"m-{n}", f"c-{n}")


async def _outlet(channel: aio_pika.abc.AbstractChannel) -> tuple[RabbitOutlet, aio_pika.abc.AbstractQueue]:
    exchange = await channel.declare_exchange(f"test.events.{uuid.uuid4().hex[:8]}", "topic", auto_delete=True)
    queue = await channel.declare_queue("", exclusive=True)
    await queue.bind(exchange, routing_key="#")
    outlet = RabbitOutlet({}, {}, cast(Any, None))
    outlet.use_channel(channel, exchange.name)
    return outlet, queue


async def _get(queue: aio_pika.abc.AbstractQueue, n: int) -> list[AbstractIncomingMessage]:
    got: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(10):
        while len(got) < n:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:  # not routed yet
                await asyncio.sleep(0.01)
                continue
            got.append(message)
    return got


async def test_many_events_are_confirmed_and_arrive_in_order_with_their_properties(
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    outlet, queue = await _outlet(channel)
    rows = [_row(i) for i in range(200)]
    await outlet.publish_events(rows)
    got = await _get(queue, len(rows))
    assert [m.body for m in got] == [r.payload for r in rows]
    for message, row in zip(got, rows, strict=True):
        assert message.routing_key == row.event_type
        assert message.message_id == row.event_id
        assert message.correlation_id == row.correlation_id
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.headers == {names.H_EVENT_TYPE: row.event_type, names.H_MESSAGE_ID: row.message_id}


async def test_a_publish_the_broker_refuses_fails_the_call_and_a_later_call_goes_out(
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    """The relay keeps what failed and calls again: once the robust channel is back, it goes out."""
    outlet, queue = await _outlet(channel)
    good = outlet.events_exchange
    outlet.use_channel(channel, "no-such-exchange")  # a publish to it closes the channel
    with pytest.raises((AMQPError, ChannelInvalidStateError)):  # NOT_FOUND closes the channel
        await outlet.publish_events([_row(1), _row(2)])
    outlet.use_channel(channel, good)
    async with asyncio.timeout(10):
        while True:
            try:
                await outlet.publish_events([_row(3)])
                break
            except (AMQPError, ChannelInvalidStateError):  # the channel is still reopening
                await asyncio.sleep(0.05)
    assert [m.body for m in await _get(queue, 1)] == [_row(3).payload]
