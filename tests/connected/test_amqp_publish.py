"""`streams.amqp` against the real RabbitMQ: many publishes in one write (`publish_confirmed`)
arrive as that many `basic_publish` calls would deliver them; deliveries handed to a plain
function (`consume_inline`) arrive whole, in order, and leave the channel's other consumers alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import aiormq
import pytest
from pamqp import commands as spec

from streams.amqp import consume_inline, publish_confirmed
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


# -- consume_inline -----------------------------------------------------------------------------


async def _publish(ch: aiormq.Channel, queue: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await ch.basic_publish(f"{i}".encode(), routing_key=queue, properties=spec.Basic.Properties(message_id=f"{i}"))


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - set by the channel's reader: nothing else to await
            await asyncio.sleep(0.01)


async def test_inline_deliveries_arrive_in_order_in_the_channels_reader(channel: aiormq.Channel) -> None:
    """Every delivery reaches the plain function, in publish order, whole, with no task of its own."""
    declared = await channel.queue_declare("", exclusive=True)
    assert declared.queue is not None
    got: list[aiormq.abc.DeliveredMessage] = []
    tasks: set[asyncio.Task[object] | None] = set()

    def on_delivery(message: aiormq.abc.DeliveredMessage) -> None:
        got.append(message)
        tasks.add(asyncio.current_task())

    await _publish(channel, declared.queue, 100)
    tag = await consume_inline(channel, declared.queue, on_delivery)
    await _until(lambda: len(got) == 100)
    assert [m.body for m in got] == [f"{i}".encode() for i in range(100)]
    assert [m.header.properties.message_id for m in got] == [f"{i}" for i in range(100)]
    assert {getattr(m.delivery, "consumer_tag", None) for m in got} == {tag}
    assert [m.delivery_tag for m in got] == list(range(1, 101)), "tags in order: one ack with multiple covers a run"
    assert len(tasks) == 1, "all called from one task, the channel's reader: none started a delivery"


async def test_a_failing_inline_consumer_is_logged_and_the_channel_keeps_delivering(
    channel: aiormq.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    declared = await channel.queue_declare("", exclusive=True)
    assert declared.queue is not None
    got: list[bytes] = []

    def on_delivery(message: aiormq.abc.DeliveredMessage) -> None:
        if message.body == b"1":
            raise RuntimeError("consumer bug")
        got.append(message.body)

    await consume_inline(channel, declared.queue, on_delivery)
    await _publish(channel, declared.queue, 3)
    await _until(lambda: len(got) == 2)
    assert got == [b"0", b"2"]
    assert "Consumer callback failed" in caplog.text
    assert not channel.is_closed


async def test_other_consumers_of_the_channel_keep_aiormqs_way_and_a_cancel_stops_inline_deliveries(
    channel: aiormq.Channel,
) -> None:
    inline_q = await channel.queue_declare("", exclusive=True)
    task_q = await channel.queue_declare("", exclusive=True)
    assert inline_q.queue is not None
    assert task_q.queue is not None
    inline_got: list[bytes] = []
    task_got: list[bytes] = []

    async def by_task(message: aiormq.abc.DeliveredMessage) -> None:
        task_got.append(message.body)

    tag = await consume_inline(channel, inline_q.queue, lambda m: inline_got.append(m.body))
    await channel.basic_consume(task_q.queue, by_task)
    await _publish(channel, inline_q.queue, 2)
    await _publish(channel, task_q.queue, 2)
    await _until(lambda: len(inline_got) == 2 and len(task_got) == 2)
    await channel.basic_cancel(tag)
    await _publish(channel, inline_q.queue, 1, start=2)
    await _publish(channel, task_q.queue, 1, start=2)
    await _until(lambda: len(task_got) == 3)  # the other consumer's delivery came after this one's
    assert inline_got == [b"0", b"1"], "nothing after the cancel"
    assert (await channel.queue_declare(inline_q.queue, passive=True)).message_count == 1, "it waits in the queue"
