"""Confirmed RabbitMQ publishes of many messages in one write.

`aiormq.Channel.basic_publish` is one message's life: a lock, a timeout scope, a drain future,
one frame put on the connection's write queue, one socket write and one drain each. The relay
publishes the outcomes of a whole batch at once, so it takes the channel's lock once, numbers
the messages for publisher confirms as `basic_publish` does, and puts all their frames on the
queue as one write; then awaits the confirms together. The broker sees the same frames, in the
same order, as from that many `basic_publish` calls.

The frames are encoded here (`publish_frames`), byte for byte as pamqp encodes them: pamqp's
generic marshalling (a method frame object, a content header walking every property by name, a
type lookup per value) took 17 µs a message, more than the rest of the publish.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import constants, encode

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
        drained: asyncio.Future[None] = channel.create_future()
        payload = publish_frames(channel.number, exchange, messages, channel.max_content_size)
        frame = ChannelFrame(payload=payload, should_close=False, drain_future=drained)
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


def publish_frames(channel: int, exchange: str, messages: Sequence[Message], max_content: int) -> bytes:
    """The wire bytes of `basic_publish` of each message, in order: its method frame, its content
    header and its body in frames of at most `max_content` bytes (none for an empty body)."""
    parts: list[bytes] = []
    for routing_key, body, properties in messages:
        parts.append(_publish_method(channel, exchange, routing_key))
        header = _HEADER_START.pack(spec.Basic.frame_id, 0, len(body)) + encode_properties(properties)
        parts.append(_frame(constants.FRAME_HEADER, channel, header))
        for start in range(0, len(body), max_content):
            parts.append(_frame(constants.FRAME_BODY, channel, body[start : start + max_content]))
    return b"".join(parts)


def encode_properties(properties: spec.Basic.Properties) -> bytes:
    """Basic.Properties as a content header carries them: the flags, then each value that is set."""
    flags = 0
    parts: list[bytes] = []
    for name, flag, kind in _PROPERTIES:
        value = getattr(properties, name)
        if value is None or value == "":  # pamqp leaves those out too
            continue
        flags |= flag
        if kind == "shortstr":
            parts.append(_short_string(value))
        elif kind == "octet":
            parts.append(_OCTET.pack(value))
        elif kind == "table":
            parts.append(_field_table(value))
        else:
            parts.append(_timestamp(value))
    return _FLAGS.pack(flags) + b"".join(parts)


_PROPERTIES = tuple(
    (name, spec.Basic.Properties.flags[name], getattr(spec.Basic.Properties, f"_{name}"))
    for name in spec.Basic.Properties.__slots__
)
_FRAME_START = struct.Struct(">BHI")
_HEADER_START = struct.Struct(">HHQ")
_FLAGS = struct.Struct(">H")
_OCTET = struct.Struct(">B")
_LONG = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")
_FRAME_END = bytes((constants.FRAME_END,))


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_START.pack(kind, channel, len(payload)) + payload + _FRAME_END


@functools.lru_cache(maxsize=1024)
def _publish_method(channel: int, exchange: str, routing_key: str) -> bytes:
    # The same few (exchange, routing key) pairs over and over: one method frame each.
    method = spec.Basic.Publish(exchange=exchange, routing_key=routing_key)
    return _frame(constants.FRAME_METHOD, channel, _LONG.pack(method.index) + method.marshal())


def _short_string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")
    return _OCTET.pack(len(raw)) + raw


def _field_table(table: Mapping[str, Any]) -> bytes:
    """A table of text values (what the pipeline sends) here; any other table as pamqp encodes it."""
    parts: list[bytes] = []
    for key, value in sorted(table.items()):
        name = key.encode()
        if type(value) is not str or len(name) > 128:  # pamqp truncates a longer field name
            return encode.field_table(dict(table))
        raw = value.encode()
        parts.append(_OCTET.pack(len(name)) + name + b"S" + _LONG.pack(len(raw)) + raw)
    body = b"".join(parts)
    return _LONG.pack(len(body)) + body


def _timestamp(value: datetime.datetime | Any) -> bytes:
    if isinstance(value, datetime.datetime) and value.tzinfo is not None and value.utcoffset() is not None:
        return _TIMESTAMP.pack(int(value.timestamp()))
    return encode.timestamp(value)  # naive (taken as UTC) or a struct_time, as pamqp does
