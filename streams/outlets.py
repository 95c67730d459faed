"""What the pipeline needs from a broker, written once per broker: read, publish, park, delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import aiormq
import redis.asyncio as aioredis
from aio_pika import DeliveryMode, Exchange
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from faststream.message import StreamMessage
from faststream.rabbit.publisher.usecase import RabbitPublisher
from faststream.redis.parser import BinaryMessageFormatV1
from faststream.redis.publisher.usecase import StreamPublisher as RedisPublisher
from pamqp import commands as spec

from streams import names, scheduler, topology
from streams.amqp import publish_confirmed
from streams.envelope import Envelope, Transport, header_str, parse_attempt, parse_count, pick_ids
from streams.resp import PackedConnection, bulk, faststream_entry, parse_faststream_entry
from streams.store import PendingEvent

DATA_KEY = b"__data__"


class Outlet(Protocol):
    """One broker as the pipeline sees it."""

    transport: Transport

    def envelope(self, msg: StreamMessage[Any], source: str) -> Envelope:
        """Read a received message once into an Envelope."""
        ...

    async def publish_events(self, rows: Sequence[PendingEvent]) -> None:
        """Publish outcome events (JSON bytes) on `events`, persistently, in order; all confirmed or raise."""
        ...

    async def dead_letter(self, env: Envelope, headers: dict[str, str]) -> None:
        """Park the message, bytes untouched, in `<source>.dlq` with the failure headers."""
        ...

    async def retry_later(self, env: Envelope, delay: float, headers: dict[str, str]) -> None:
        """Hand the message back to the broker to deliver again to its source after `delay` s."""
        ...


def _text_headers(raw: dict[str, Any]) -> dict[str, str]:
    return {k: v for k in raw if (v := header_str(raw, k)) is not None}


def _rabbit_envelope(
    source: str,
    body: bytes,
    raw_headers: Mapping[str, Any] | None,
    native_message_id: str | None,
    native_correlation_id: str | None,
    content_type: str | None,
    redelivered: bool | None,
    timestamp: datetime | None,
) -> Envelope:
    headers = _text_headers(dict(raw_headers or {}))
    message_id, correlation_id = pick_ids(headers, native_message_id, native_correlation_id, source, body)
    if content_type:
        headers.setdefault("content-type", content_type)
    return Envelope(
        transport="rabbit",
        source=source,
        message_id=message_id,
        correlation_id=correlation_id,
        body=body,
        headers=headers,
        attempt=parse_attempt(headers.get(names.H_ATTEMPTS)),
        # Quorum queues count returns in `x-delivery-count`; the flag covers a requeue it skips.
        redeliveries=max(parse_count(headers.get("x-delivery-count")), int(bool(redelivered))),
        published_at=timestamp.timestamp() if timestamp else None,
    )


def _event_properties(row: PendingEvent, stamp: datetime) -> spec.Basic.Properties:
    """An outcome event as RabbitMQ carries it: persistent JSON, the event id as message id."""
    return spec.Basic.Properties(
        delivery_mode=int(DeliveryMode.PERSISTENT),
        message_id=row.event_id,
        correlation_id=row.correlation_id,
        content_type="application/json",
        timestamp=stamp,
        headers={names.H_EVENT_TYPE: row.event_type, names.H_MESSAGE_ID: row.message_id},
    )


class RabbitOutlet:
    """RabbitMQ: events on the topic exchange, dead letters and delays through queues."""

    transport: Transport = "rabbit"

    def __init__(
        self,
        events: dict[str, RabbitPublisher],
        dead_letters: dict[str, RabbitPublisher],
        delay: RabbitPublisher,
    ) -> None:
        self.events = events  # document the channel (AsyncAPI); in-memory tests publish through them
        self.dead_letters = dead_letters
        self.delay = delay
        # Set once connected (`use_exchange`): outcome events then go straight to aio-pika. The
        # relay is the hot path; FastStream's publisher adds its middlewares (metrics, logging)
        # and call chain to every event (17% of the worker's CPU in `make bench-profile`).
        self.events_exchange: AbstractExchange | None = None

    def use_exchange(self, exchange: AbstractExchange) -> None:
        """Publish outcome events straight to this (confirming) `events` exchange."""
        self.events_exchange = exchange

    def envelope(self, msg: StreamMessage[Any], source: str) -> Envelope:
        return self.delivered(msg.raw_message, source)

    @staticmethod
    def delivered(raw: AbstractIncomingMessage, source: str) -> Envelope:
        """The Envelope of a message aio-pika delivered from `source`."""
        return _rabbit_envelope(
            source,
            raw.body,
            raw.headers,
            raw.message_id,
            raw.correlation_id,
            raw.content_type,
            raw.redelivered,
            raw.timestamp,
        )

    @staticmethod
    def framed(raw: DeliveredMessage, source: str) -> Envelope:
        """The Envelope of a message aiormq delivered from `source` (no aio-pika message in between)."""
        p = raw.header.properties
        return _rabbit_envelope(
            source, raw.body, p.headers, p.message_id, p.correlation_id, p.content_type, raw.redelivered, p.timestamp
        )

    async def publish_events(self, rows: Sequence[PendingEvent]) -> None:
        # Sent in order on one channel; the confirms are awaited together, not one by one.
        exchange = self.events_exchange
        if exchange is None:
            await asyncio.gather(*(self._publish_event(row) for row in rows))
            return
        # Straight to aiormq, all in one write (`streams.amqp`): aio-pika's Message object, and
        # aiormq's per-publish lock, write and drain, cost more CPU than the frames themselves
        # (`make bench-profile`). A nack raises DeliveryError.
        channel = cast(aiormq.Channel, await cast(Exchange, exchange).channel.get_underlay_channel())
        stamp = datetime.now(UTC).replace(microsecond=0)
        await publish_confirmed(
            channel, exchange.name, [(row.event_type, row.payload, _event_properties(row, stamp)) for row in rows]
        )

    async def _publish_event(self, row: PendingEvent) -> None:
        await self.events[row.event_type].publish(
            row.payload,
            routing_key=row.event_type,
            persist=True,
            message_id=row.event_id,
            correlation_id=row.correlation_id,
            content_type="application/json",
            headers={names.H_EVENT_TYPE: row.event_type, names.H_MESSAGE_ID: row.message_id},
        )

    @staticmethod
    def _properties(env: Envelope, headers: dict[str, str]) -> dict[str, Any]:
        """The original message's properties, with `headers` laid over its headers."""
        return {
            "persist": True,
            "message_id": env.message_id,
            "correlation_id": env.correlation_id,
            "content_type": env.headers.get("content-type") or "application/octet-stream",
            "headers": {**env.headers, **headers},
        }

    async def dead_letter(self, env: Envelope, headers: dict[str, str]) -> None:
        await self.dead_letters[env.source].publish(env.body, **self._properties(env, headers))

    async def retry_later(self, env: Envelope, delay: float, headers: dict[str, str]) -> None:
        await self.delay.publish(
            env.body,
            routing_key=topology.delay_routing_key(delay, env.source),
            **self._properties(env, headers),
        )


class RedisOutlet:
    """Redis Streams: events on stream `events`, dead letters verbatim in `<stream>.dlq`."""

    transport: Transport = "redis"

    def __init__(
        self,
        events: RedisPublisher,
        client: aioredis.Redis,
        groups: dict[str, str],
        *,
        stream: str = names.EVENTS_STREAM,
    ) -> None:
        self.events = events  # documents the channel; the relay writes through `client`
        self.events_stream = stream
        self.client = client
        self._xadds: PackedConnection | None = None  # the outcome XADDs' connection, made on first use
        head = (b"XADD", self.events_stream.encode(), b"*", DATA_KEY)
        self._xadd_head = b"*5\r\n" + b"".join(bulk(arg) for arg in head)  # the entry's bulk follows
        self.groups = groups

    def envelope(self, msg: StreamMessage[Any], source: str) -> Envelope:
        raw = msg.raw_message
        entry_ids = raw.get("message_ids") or []
        return self.entry(source, entry_ids[0].decode() if entry_ids else None, dict(raw["data"]))

    @staticmethod
    def entry(source: str, entry_id: str | None, fields: dict[bytes, bytes]) -> Envelope:
        """The Envelope of one stream entry: its id and its fields as stored."""
        data = fields.get(DATA_KEY)
        if data is not None:
            body, envelope_headers = parse_faststream_entry(data)
            headers = _text_headers(envelope_headers)
        else:
            # A plain entry written by a non-FastStream producer: its fields are the message.
            body, headers = b"", {}
            headers.update({k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()})
        native_id = headers.get("message_id")
        # Without any id, the entry id is the stable identity of this message on this stream.
        identity = f"{entry_id}".encode() if entry_id else (body or repr(sorted(fields.items())).encode())
        message_id, correlation_id = pick_ids(headers, native_id, headers.get("correlation_id"), source, identity)
        return Envelope(
            transport="redis",
            source=source,
            message_id=message_id,
            correlation_id=correlation_id,
            body=body,
            headers=headers,
            attempt=parse_attempt(headers.get(names.H_ATTEMPTS)),
            fields=fields,
            entry_id=entry_id,
            published_at=int(entry_id.split("-", 1)[0]) / 1000 if entry_id else None,
        )

    async def publish_events(self, rows: Sequence[PendingEvent]) -> None:
        """XADD each row to `events` in FastStream's envelope, in order, in one round trip.

        Packed here and sent on a connection of the outlet's own (`streams.resp`): FastStream's
        encoder and a redis-py pipeline cost 6.2 + 11.9 us of CPU an event, these 1.7 + 1.45
        (128 events a call, side by side). Some may have been added when it raises: the relay
        publishes them again, and consumers dedupe on the event id (`message_id`).
        """
        if self._xadds is None:
            self._xadds = PackedConnection(self.client)
        head = self._xadd_head
        packed = b"".join(
            head
            + bulk(
                faststream_entry(
                    row.payload,
                    (
                        ("correlation_id", row.correlation_id),
                        ("content-type", "application/json"),
                        (names.H_EVENT_TYPE, row.event_type),
                        (names.H_MESSAGE_ID, row.message_id),
                        ("message_id", row.event_id),
                    ),
                )
            )
            for row in rows
        )
        await self._xadds.exchange(packed, len(rows))

    async def close(self) -> None:
        """Close the outlet's own connection (the client is closed by its owner)."""
        if self._xadds is not None:
            await self._xadds.close()

    async def dead_letter(self, env: Envelope, headers: dict[str, str]) -> None:
        # The entry's own fields go in untouched; the failure headers ride beside them. Parking
        # and acknowledging happen in one MULTI: the entry is never in both places, nor in none.
        entry: dict[bytes, bytes] = dict(env.fields or {})
        entry.update({k.encode(): v.encode() for k, v in headers.items()})
        async with self.client.pipeline(transaction=True) as tx:
            tx.xadd(names.dlq(env.source), entry)  # type: ignore[arg-type]
            self._ack(tx, env)
            await tx.execute()

    async def retry_later(self, env: Envelope, delay: float, headers: dict[str, str]) -> None:
        # The retry copy goes into the scheduled set and the original is acknowledged atomically;
        # the mover (streams.scheduler) puts it back into the stream when it is due.
        fields = await self._with_headers(env, headers)
        due_ms = int((time.time() + delay) * 1000)
        await scheduler.schedule(self.client, env.source, fields, due_ms, ack=lambda tx: self._ack(tx, env))

    def _ack(self, tx: Any, env: Envelope) -> None:
        group = self.groups.get(env.source)
        if group is not None and env.entry_id is not None:
            tx.xack(env.source, group, env.entry_id)

    @staticmethod
    async def _with_headers(env: Envelope, headers: dict[str, str]) -> dict[bytes, bytes]:
        """The entry's fields with `headers` laid over its headers; the body stays byte for byte."""
        fields = dict(env.fields or {})
        if DATA_KEY in fields:
            fields[DATA_KEY] = await BinaryMessageFormatV1.encode(
                message=env.body,
                reply_to=None,
                headers={**env.headers, **headers},
                correlation_id=env.correlation_id,
            )
        else:
            fields.update({k.encode(): v.encode() for k, v in headers.items()})
        return fields
