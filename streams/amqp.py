"""Confirmed RabbitMQ publishes of many messages in one write.

`aiormq.Channel.basic_publish` is one message's life: a lock, a timeout scope, a drain future,
one frame put on the connection's write queue, one socket write and one drain each. The relay
publishes the outcomes of a whole batch at once, so it takes the channel's lock once, numbers
the messages for publisher confirms as `basic_publish` does, and puts all their frames on the
queue as one write; then awaits the confirms together. The broker sees the same frames, in the
same order, as from that many `basic_publish` calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

Message = tuple[str, bytes, spec.Basic.Properties]  # routing key, body, properties


async def publish_confirmed(channel: aiormq.Channel, exchange: str, messages: Sequence[Message]) -> None:
    """Publish `messages` on `exchange` in order, in one write; return once the broker confirmed
    them all. Raises `aiormq.exceptions.DeliveryError` on a nack, or what closed the channel."""
    if not messages:
        return
    if not channel.publisher_confirms:
        raise ValueError("publish_confirmed needs a channel with publisher confirms")
    confirmations: list[asyncio.Future[object]] = []
    async with channel.lock:
        first = channel.delivery_tag + 1
        frames: list[object] = []
        for routing_key, body, properties in messages:
            frames.append(spec.Basic.Publish(exchange=exchange, routing_key=routing_key))
            frames.append(ContentHeader(properties=properties, body_size=len(body)))
            frames.extend(channel._split_body(body))  # bodies past frame_max in pieces, as basic_publish
        drained: asyncio.Future[None] = channel.create_future()
        frame = ChannelFrame.marshall(channel_number=channel.number, frames=frames, drain_future=drained)  # type: ignore[arg-type]
        for tag in range(first, first + len(messages)):
            confirmation: asyncio.Future[object] = channel.create_future()
            channel.confirmations[tag] = confirmation
            confirmations.append(confirmation)
        channel.delivery_tag = first + len(messages) - 1
        try:
            await channel.write_queue.put(frame)
        except BaseException:
            # Not queued, so the broker never sees these tags: give them back, as basic_publish does.
            channel.delivery_tag = first - 1
            for tag, confirmation in zip(range(first, first + len(messages)), confirmations, strict=True):
                channel.confirmations.pop(tag, None)
                confirmation.cancel()
            drained.cancel()
            raise
        await drained
    await asyncio.gather(*confirmations)
