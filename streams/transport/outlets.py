"""What the pipeline needs from a broker, written once per broker: read, publish, park, delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import aiormq
import redis.asyncio as aioredis
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import DeliveryError
from faststream.rabbit.publisher.usecase import RabbitPublisher
from faststream.redis.parser import BinaryMessageFormatV1
from faststream.redis.publisher.usecase import StreamPublisher as RedisPublisher
from pamqp import commands as spec

from streams.core import names
from streams.core.envelope import Envelope, Transport, header_str, parse_attempt, parse_count, pick_ids
from streams.eventstore.store import PendingEvent
from streams.transport import scheduler, topology
from streams.transport.keepalive import PendingKeepalive

DATA_KEY = b"__data__"


class Outlet(Protocol):
    """One broker as the pipeline sees it."""

    transport: Transport

    def envelope(self, raw: Any, source: str) -> Envelope:
        """Read a message as the broker client delivered it, once, into an Envelope."""
        ...

    def entries(self, raw: Any, source: str) -> list[Envelope]:
        """The Envelopes of the messages one batch read delivered, in order."""
        ...

    def release(self, envs: Sequence[Envelope]) -> None:
        """These messages are done with here (acknowledged, parked, or left to the broker)."""
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
        # Set once connected (`use_channel`): outcome events then go out on a confirming channel of
        # the worker's own, beside FastStream's (whose publishers add a call chain to every event).
        self.events_channel: AbstractChannel | None = None
        self.events_exchange = names.EVENTS_EXCHANGE

    def use_channel(self, channel: AbstractChannel, exchange: str = names.EVENTS_EXCHANGE) -> None:
        """Publish outcome events on `channel` (publisher confirms on) to `exchange`."""
        self.events_channel = channel
        self.events_exchange = exchange

    def envelope(self, raw: Any, source: str) -> Envelope:
        return self.delivered(raw, source)

    def entries(self, raw: Any, source: str) -> list[Envelope]:
        return [self.delivered(raw, source)]  # RabbitMQ delivers one message at a time

    def release(self, envs: Sequence[Envelope]) -> None:
        return None  # the broker tracks what a consumer holds

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

    async def publish_events(self, rows: Sequence[PendingEvent]) -> None:
        if self.events_channel is None:  # not connected to a real broker (in-memory tests): FastStream's publishers
            await asyncio.gather(*(self._publish_event(row) for row in rows))
            return
        # aiormq's public `basic_publish` on the (robust) channel's current channel: each publish is
        # queued in call order without waiting for the socket, and the confirms are awaited together.
        channel = cast(aiormq.Channel, await self.events_channel.get_underlay_channel())
        stamp = datetime.now(UTC).replace(microsecond=0)
        confirms = await asyncio.gather(
            *(
                channel.basic_publish(
                    row.payload,
                    exchange=self.events_exchange,
                    routing_key=row.event_type,
                    properties=_event_properties(row, stamp),
                    wait=False,
                )
                for row in rows
            )
        )
        for confirm in confirms:
            if not isinstance(confirm, spec.Basic.Ack):
                raise DeliveryError(None, cast(Any, confirm))  # aiormq's error for a refused publish

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


def ascii_header(value: str) -> str:
    """A header value FastStream's binary envelope keeps intact: non-ASCII characters escaped.

    FastStream 0.7.8's `BinaryMessageFormatV1.encode` writes a string's length in characters, not
    bytes, so a non-ASCII value corrupts the whole entry (the body's bytes are untouched either way;
    the event's JSON body keeps every id exactly).
    """
    return value if value.isascii() else value.encode("ascii", "backslashreplace").decode("ascii")


def envelope_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers for FastStream's binary envelope (`ascii_header` on every value)."""
    return {k: ascii_header(v) for k, v in headers.items()}


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
        self.groups = groups
        # Entries read here and not yet acknowledged or parked: kept from reclaimers while we live.
        self.keepalive: PendingKeepalive | None = None

    def entries(self, raw: Any, source: str) -> list[Envelope]:
        """The Envelopes of the entries a batch read delivered, in order."""
        data = raw["data"]
        ids = raw.get("message_ids") or [None] * len(data)  # an in-memory test broker has no entry ids
        envs = [
            self.entry(source, entry_id.decode() if entry_id else None, dict(fields))
            for entry_id, fields in zip(ids, data, strict=True)
        ]
        self._hold(source, envs)
        return envs

    def _hold(self, source: str, envs: Sequence[Envelope]) -> None:
        if self.keepalive is not None:
            self.keepalive.hold(source, (env.entry_id for env in envs))

    def release(self, envs: Sequence[Envelope]) -> None:
        if self.keepalive is not None:
            for env in envs:
                self.keepalive.release(env.source, (env.entry_id,))

    async def ack(self, source: str, envs: Sequence[Envelope]) -> None:
        """Acknowledge entries of `source` whose outcomes are committed (or parked), with one XACK."""
        ids = [env.entry_id for env in envs if env.entry_id is not None]
        group = self.groups.get(source)
        try:
            if ids and group is not None:
                await self.client.xack(source, group, *ids)
        finally:
            self.release(envs)

    def envelope(self, raw: Any, source: str) -> Envelope:
        entry_ids = raw.get("message_ids") or []
        env = self.entry(source, entry_ids[0].decode() if entry_ids else None, dict(raw["data"]))
        self._hold(source, [env])
        return env

    @staticmethod
    def entry(source: str, entry_id: str | None, fields: dict[bytes, bytes]) -> Envelope:
        """The Envelope of one stream entry: its id and its fields as stored."""
        data = fields.get(DATA_KEY)
        if data is not None:
            body, envelope_headers = BinaryMessageFormatV1.parse(data)
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
        """XADD each row to `events` in FastStream's envelope, in order, in one redis-py pipeline.

        Some may have been added when it raises: the relay publishes them again, and consumers
        dedupe on the event id (`message_id`).
        """
        entries = [
            await BinaryMessageFormatV1.encode(
                message=row.payload,
                reply_to=None,
                headers=envelope_headers(
                    {
                        "content-type": "application/json",
                        names.H_EVENT_TYPE: row.event_type,
                        names.H_MESSAGE_ID: row.message_id,
                        "message_id": row.event_id,
                    }
                ),
                correlation_id=ascii_header(row.correlation_id),
            )
            for row in rows
        ]
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xadd(self.events_stream, {DATA_KEY: entry})
            await pipe.execute()

    async def close(self) -> None:
        """Nothing of its own to close: the client is closed by its owner."""

    async def dead_letter(self, env: Envelope, headers: dict[str, str]) -> None:
        # The entry's own fields go in untouched; the failure headers ride beside them. Parking
        # and acknowledging happen in one MULTI: the entry is never in both places, nor in none.
        entry: dict[bytes, bytes] = dict(env.fields or {})
        entry.update({k.encode(): v.encode() for k, v in headers.items()})
        async with self.client.pipeline(transaction=True) as tx:
            tx.xadd(names.dlq(env.source), entry)  # type: ignore[arg-type]
            self._ack(tx, env)
            await tx.execute()
        self.release([env])

    async def retry_later(self, env: Envelope, delay: float, headers: dict[str, str]) -> None:
        # The retry copy goes into the scheduled set and the original is acknowledged atomically;
        # the mover (streams.transport.scheduler) puts it back into the stream when it is due.
        fields = await self._with_headers(env, headers)
        due_ms = int((time.time() + delay) * 1000)
        await scheduler.schedule(self.client, env.source, fields, due_ms, ack=lambda tx: self._ack(tx, env))
        self.release([env])

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
                headers=envelope_headers({**env.headers, **headers}),
                correlation_id=ascii_header(env.correlation_id),
            )
        else:
            fields.update({k.encode(): v.encode() for k, v in headers.items()})
        return fields
