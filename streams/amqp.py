"""Confirmed RabbitMQ publishes of many messages in one write, and frames read a buffer at a time.

`aiormq.Channel.basic_publish` is one message's life: a lock, a timeout scope, a drain future,
one frame put on the connection's write queue, one socket write and one drain each. The relay
publishes the outcomes of a whole batch at once, so it takes the channel's lock once, numbers
the messages for publisher confirms as `basic_publish` does, and puts all their frames on the
queue as one write; then awaits the confirms together. The broker sees the same frames, in the
same order, as from that many `basic_publish` calls.

The frames are encoded here (`publish_frames`), byte for byte as pamqp encodes them: pamqp's
generic marshalling (a method frame object, a content header walking every property by name, a
type lookup per value) took 17 µs a message, more than the rest of the publish.

Reading is the same story the other way (`FrameReader`): aiormq reads every frame with three
`readexactly` awaits under a lock into a `BytesIO`, and pamqp decodes it generically, slicing
a new copy of the rest of the frame after every field. A delivery is three frames. The reader
here takes what the socket has buffered, cuts it into frames, and decodes the frames of every
message (Basic.Deliver, its content header, its body, the broker's Basic.Ack confirms) itself,
into the very pamqp objects pamqp would make; any other frame, or anything unusual in these
(a header table value of a rarer type, a second property flag word), goes to pamqp as before.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import struct
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiormq
import aiormq.connection
import pamqp.frame
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import AMQPConnectionError
from pamqp import body as pamqp_body
from pamqp import commands as spec
from pamqp import constants, encode
from pamqp import header as pamqp_header

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


# -- reading ------------------------------------------------------------------------------------

ReceivedFrame = tuple[int, int, Any]  # bytes the frame took, channel, the pamqp frame object
READ_SIZE = 1 << 18  # at most this much of what the socket has buffered, a read


class FrameReader(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading whole buffers and decoding the frames of messages itself.

    The connection's handshake (the protocol header, which the broker may answer with its own)
    goes through aiormq's reader as before; from the first frame on, this one reads. It yields
    what aiormq's does: (bytes the frame took, channel, the frame as pamqp decodes it).
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = b""
        self._frames: deque[ReceivedFrame] = deque()

    async def get_frame(self) -> ReceivedFrame:
        frames = self._frames
        if frames:
            return frames.popleft()
        if not self.started:
            return await super().get_frame()
        while True:
            data = await self._read()
            if not data:
                if self._buffer:
                    raise AMQPConnectionError(
                        f"Server connection unexpectedly closed inside a frame ({len(self._buffer)} bytes read)"
                    )
                raise StopAsyncIteration
            buffer = self._buffer + data if self._buffer else data
            self._buffer = buffer[split_frames(buffer, frames) :]
            if frames:
                return frames.popleft()

    async def _read(self) -> bytes:
        try:
            return await self.reader.read(READ_SIZE)
        except ConnectionError as exc:
            raise AMQPConnectionError(f"Server connection error: {exc!r}") from exc
        except OSError as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc


# -- writing a queue at a time ------------------------------------------------------------------


class _Frames(ChannelFrame):
    """Frames queued one after another, written as one: each drained when the write is."""

    def __init__(self, frames: list[ChannelFrame]) -> None:
        super().__init__(payload=b"".join(f.payload for f in frames), should_close=frames[-1].should_close)
        object.__setattr__(self, "frames", frames)  # a frozen dataclass

    def drain(self) -> None:
        for frame in self.frames:  # type: ignore[attr-defined]
            frame.drain()

    @property
    def should_drain(self) -> bool:
        return any(frame.should_drain for frame in self.frames)  # type: ignore[attr-defined]


class FrameWriter(aiormq.connection.FrameGenerator):
    """aiormq's frame source for its connection writer, handing over everything queued at once.

    aiormq's writer takes one queued frame at a time and makes a socket write of each. Loopback
    writes are not cheap here (the broker is woken for each: 40-50 µs of CPU a write on this VM,
    `cProfile` of a worker at 1,000 msg/s), and what a batch sends (its outcomes, its
    acknowledgement, a second batch's) is queued within one turn of the loop. The frames keep their
    order; a frame that closes the connection ends the run (nothing is sent after it, as before).
    """

    async def __anext__(self) -> ChannelFrame:
        frame = await super().__anext__()
        queue = self.queue
        if frame.should_close or queue.empty():
            return frame
        frames = [frame]
        while not queue.empty():
            frame = queue.get_nowait()
            queue.task_done()
            frames.append(frame)
            if frame.should_close:
                break
        return _Frames(frames)


def send_now(channel: aiormq.Channel, method: spec.Basic.Ack | spec.Basic.Reject) -> bool:
    """Queue one method frame (an acknowledgement) on the channel's connection without awaiting;
    False when it cannot be queued now (the queue is full or the channel closed): send it the
    awaited way then, after any frame queued before it."""
    if channel.is_closed:
        return False
    try:
        channel.write_queue.put_nowait(ChannelFrame.marshall(channel.number, [method]))
    except asyncio.QueueFull:
        return False
    return True


def install() -> None:
    """Make every aiormq connection opened from now on read with `FrameReader` and write with `FrameWriter`."""
    aiormq.connection.FrameReceiver = FrameReader  # type: ignore[misc]
    aiormq.connection.FrameGenerator = FrameWriter  # type: ignore[misc]


# -- deliveries without a task each --------------------------------------------------------------

OnDelivery = Callable[[DeliveredMessage], None]


async def consume_inline(channel: aiormq.Channel, queue: str, on_delivery: OnDelivery) -> str:
    """`basic_consume`, with the deliveries handed to `on_delivery`, a plain function, in the
    channel's reader; returns the consumer tag.

    aiormq starts a task for every delivery to run its consumer coroutine (a task, a wrapper, a
    weak reference in the channel's future store, a done callback): 42 -> 33 µs of CPU a delivery
    in a side-by-side consumer. A lane's consumer only queues the delivery for its next batch:
    called inline it costs a function call, and sees deliveries in the order they arrived (which
    acknowledgements with `multiple` rely on). It is in place before the consumer starts, so no
    delivery takes the other way. `on_delivery` must not block; what it raises is logged as
    aiormq logs a failed consumer. Other consumers of the channel get their tasks as before.
    """
    inline = _inline_consumers(channel)
    tag = f"ctag{channel.number}.{uuid.uuid4().hex}"
    inline[tag] = on_delivery

    async def by_task(message: DeliveredMessage) -> None:  # what aiormq calls it, were it ever to
        on_delivery(message)

    try:
        await channel.basic_consume(queue, by_task, consumer_tag=tag)
    except BaseException:
        inline.pop(tag, None)
        raise
    return tag


def _inline_consumers(channel: aiormq.Channel) -> dict[str, OnDelivery]:
    inline: dict[str, OnDelivery] | None = getattr(channel, "_inline_consumers", None)
    if inline is not None:
        return inline
    inline = {}
    channel._inline_consumers = inline  # type: ignore[attr-defined]
    by_task = channel._on_deliver_frame

    async def on_deliver_frame(frame: spec.Basic.Deliver) -> None:
        tag = frame.consumer_tag
        callback = inline.get(tag) if tag is not None and tag in channel.consumers else None
        if callback is None:  # another consumer, or one cancelled: aiormq's way
            await by_task(frame)
            return
        # What aiormq's reader does before it starts the consumer's task: the content header,
        # then the body frames.
        header = await channel._get_frame()
        if not isinstance(header, pamqp_header.ContentHeader):
            raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
        message = await channel._read_content(frame, header)
        try:
            callback(message)
        except Exception:  # noqa: BLE001 - as aiormq's consumer task: logged, the channel reads on
            _consumer_log.exception("Consumer callback failed")

    channel._on_deliver_frame = on_deliver_frame  # type: ignore[method-assign]
    return inline


_consumer_log = logging.getLogger("aiormq.channel")


def split_frames(buffer: bytes, into: deque[ReceivedFrame]) -> int:
    """Decode every whole frame at the start of `buffer` into `into`; returns the bytes they took."""
    pos, size = 0, len(buffer)
    while size - pos >= 8:  # the smallest frame: a 7-byte header and the end byte
        kind, channel, length = _FRAME_START.unpack_from(buffer, pos)
        end = pos + 7 + length
        if end >= size:
            break
        into.append(unmarshal(buffer[pos : end + 1], kind, channel))
        pos = end + 1
    return pos


def unmarshal(frame: bytes, kind: int, channel: int) -> ReceivedFrame:
    """One whole frame (its header, payload and end byte), decoded as `pamqp.frame.unmarshal` does."""
    if frame[-1] == constants.FRAME_END:
        try:
            if kind == constants.FRAME_BODY and len(frame) > 8:  # pamqp refuses an empty one
                return len(frame), channel, _body(frame[7:-1])
            if kind == constants.FRAME_HEADER:
                return len(frame), channel, _content_header(frame)
            if kind == constants.FRAME_METHOD:
                method = _LONG.unpack_from(frame, 7)[0]
                if method == _DELIVER:
                    return len(frame), channel, _deliver(frame)
                if method == _ACK:
                    return len(frame), channel, _ack(frame)
        except Exception:  # noqa: BLE001, S110 - whatever is unusual or wrong, pamqp decides (and says what)
            pass
    try:
        return pamqp.frame.unmarshal(frame)
    except pamqp.exceptions.PAMQPException as exc:
        raise aiormq.exceptions.InvalidFrameError(str(exc)) from exc


class _Unusual(Exception):
    """Left to pamqp: a case the decoders here do not handle, or bytes they do not expect."""


_DELIVER = spec.Basic.Deliver.index
_ACK = spec.Basic.Ack.index
_HEADER = struct.Struct(">HHQH")  # class id, weight, body size, the first property flag word
_LONG_LONG = struct.Struct(">q")
_NUMBERS = {ord(kind): struct.Struct(f">{code}") for kind, code in zip("bBsuIilLfd", "bBhHlLqqfd", strict=True)}
# What pamqp leaves in a property the header does not carry: None, but "" for cluster_id.
_READ_PROPERTIES = tuple((name, flag, kind, "" if name == "cluster_id" else None) for name, flag, kind in _PROPERTIES)


def _body(value: bytes) -> pamqp_body.ContentBody:
    frame = object.__new__(pamqp_body.ContentBody)
    frame.value = value
    return frame


def _short(frame: bytes, pos: int) -> tuple[str, int]:
    end = pos + 1 + frame[pos]
    if end > len(frame) - 1:
        raise _Unusual
    return frame[pos + 1 : end].decode(), end  # not UTF-8: `unmarshal` leaves it to pamqp


def _deliver(frame: bytes) -> spec.Basic.Deliver:
    consumer_tag, pos = _short(frame, 11)
    delivery_tag = _LONG_LONG.unpack_from(frame, pos)[0]
    redelivered = bool(frame[pos + 8] & 1)
    exchange, pos = _short(frame, pos + 9)
    routing_key, pos = _short(frame, pos)
    method = object.__new__(spec.Basic.Deliver)
    method.consumer_tag = consumer_tag
    method.delivery_tag = delivery_tag
    method.redelivered = redelivered
    method.exchange = exchange
    method.routing_key = routing_key
    return method


def _ack(frame: bytes) -> spec.Basic.Ack:
    if len(frame) != 7 + 4 + 9 + 1:
        raise _Unusual
    method = object.__new__(spec.Basic.Ack)
    method.delivery_tag = _LONG_LONG.unpack_from(frame, 11)[0]
    method.multiple = bool(frame[19] & 1)
    return method


def _content_header(frame: bytes) -> pamqp_header.ContentHeader:
    if len(frame) < 7 + 14 + 1:
        raise _Unusual
    class_id, weight, body_size, flags = _HEADER.unpack_from(frame, 7)
    if flags & 1:  # a second flag word: never sent for Basic
        raise _Unusual
    properties = object.__new__(spec.Basic.Properties)
    pos = 21
    for name, flag, kind, absent in _READ_PROPERTIES:
        if not flags & flag:
            setattr(properties, name, absent)
            continue
        value: Any
        if kind == "shortstr":
            value, pos = _short(frame, pos)
        elif kind == "octet":
            value, pos = frame[pos], pos + 1
        elif kind == "table":
            value, pos = _table(frame, pos)
        else:
            value, pos = _timestamp_at(frame, pos)
        setattr(properties, name, value)
    if pos > len(frame) - 1:
        raise _Unusual
    header = object.__new__(pamqp_header.ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = properties
    return header


def _timestamp_at(frame: bytes, pos: int) -> tuple[datetime.datetime, int]:
    value: float = _TIMESTAMP.unpack_from(frame, pos)[0]
    if value > 0xFFFFFFFF:  # pamqp: past the year 2106, it must be milliseconds
        value /= 1000.0
    return datetime.datetime.fromtimestamp(value, tz=datetime.UTC), pos + 8


def _table(frame: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """A field table of the value types messages carry; any other type is left to pamqp."""
    end = pos + 4 + _LONG.unpack_from(frame, pos)[0]
    if end > len(frame) - 1:
        raise _Unusual
    pos += 4
    table: dict[str, Any] = {}
    while pos < end:
        key, pos = _short(frame, pos)
        kind = frame[pos]
        pos += 1
        value: Any
        if kind == 0x53:  # S: long string, text when it is UTF-8 (as pamqp)
            stop = pos + 4 + _LONG.unpack_from(frame, pos)[0]
            if stop > end:
                raise _Unusual
            raw = frame[pos + 4 : stop]
            try:
                value = raw.decode()
            except UnicodeDecodeError:
                value = raw
            pos = stop
        elif kind in _NUMBERS:  # b s u I i l L f d: numbers, signed or not as pamqp reads them
            number = _NUMBERS[kind]
            value, pos = number.unpack_from(frame, pos)[0], pos + number.size
        elif kind == 0x74:  # t: boolean
            value, pos = bool(frame[pos]), pos + 1
        elif kind == 0x46:  # F: a nested table
            value, pos = _table(frame, pos)
        elif kind == 0x54:  # T: timestamp
            value, pos = _timestamp_at(frame, pos)
        elif kind == 0x56:  # V: void
            value = None
        else:
            raise _Unusual
        table[key] = value
    if pos != end:
        raise _Unusual
    return table, end
