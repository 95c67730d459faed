"""Dead letters kept for review: query them, replay them through the normal path, purge them.

The `dead_letters` table of the event store is the review store. Replaying a dead letter puts
its original bytes back where they first arrived (RabbitMQ: the default exchange, routing key =
the queue; Redis: XADD to the stream) with the same message id and correlation id, without the
failure and retry headers (so the attempt count starts again at 1) and with `x-replayed-from`
naming the dead letter. A row is marked replayed only after the broker confirmed the publish.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from redis.exceptions import RedisError
from sqlalchemy import Select, delete, func, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from streams import names
from streams.settings import mask_url
from streams.store import EventStore
from streams.tables import dead_letters

H_REPLAYED_FROM = "x-replayed-from"
DATA_KEY = b"__data__"
# What the pipeline and the broker add on failure; dropped on replay so the message starts afresh.
FAILURE_HEADERS = frozenset(
    {
        names.H_FAILURE_KIND,
        names.H_ATTEMPTS,
        names.H_FIRST_FAILURE_AT,
        names.H_LAST_FAILURE_AT,
        names.H_ORIGINAL_QUEUE,
        "x-delivery-count",
        "x-death",
        H_REPLAYED_FROM,  # a dead letter replayed before names its own, older, origin
    }
)
# x-exception-* from the pipeline; x-first-death-* / x-last-death-* from RabbitMQ's own dead-lettering.
FAILURE_HEADER_PREFIXES = ("x-exception-", "x-first-death-", "x-last-death-")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^@\s/]+)@")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class DeadLetterError(Exception):
    """Raised when a dead-letter operation cannot be carried out; the text is shown as is."""


class StoreError(DeadLetterError):
    """Raised when the review store (the database) cannot be read or written."""


class BrokerError(DeadLetterError):
    """Raised when a broker cannot be reached or does not take a replayed message."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row of `dead_letters`."""

    id: int
    transport: str
    queue: str
    message_id: str
    correlation_id: str
    kind: str
    exception_type: str
    exception_message: str
    stacktrace: str
    attempts: int
    headers: dict[str, Any]
    body: bytes
    fields: dict[str, str] | None
    dead_lettered_at: datetime
    replayed_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DeadLetter:
        """A row as read; SQLite hands back naive datetimes, which were written in UTC."""
        data = dict(row)
        data["dead_lettered_at"] = _utc(data["dead_lettered_at"])
        data["replayed_at"] = _utc(data["replayed_at"]) if data["replayed_at"] is not None else None
        data["body"] = bytes(data["body"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command applies to."""

    queue: str | None = None
    kind: str | None = None
    include_replayed: bool = True

    def apply(self, query: Select[Any]) -> Select[Any]:
        """The query narrowed to this selection."""
        if self.queue is not None:
            query = query.where(dead_letters.c.queue == self.queue)
        if self.kind is not None:
            query = query.where(dead_letters.c.kind == self.kind)
        if not self.include_replayed:
            query = query.where(dead_letters.c.replayed_at.is_(None))
        return query


@dataclass(frozen=True, slots=True)
class PurgeGroup:
    """How many matching dead letters one (transport, queue, kind) holds."""

    transport: str
    queue: str
    kind: str
    count: int


@dataclass(frozen=True, slots=True)
class PurgePlan:
    """What a purge would delete: the matching rows up to `max_id`, so later arrivals are spared."""

    selection: Selection
    groups: tuple[PurgeGroup, ...]
    max_id: int

    @property
    def total(self) -> int:
        """Rows that would be deleted."""
        return sum(g.count for g in self.groups)

    @property
    def broker_queues(self) -> list[tuple[str, str]]:
        """(transport, dead-letter queue or stream) of every queue the matching rows came from."""
        return sorted({(g.transport, names.dlq(g.queue)) for g in self.groups})


# --- presentation helpers (pure) -----------------------------------------------------------------


def redact(text: str) -> str:
    """The text with every URL password replaced by `***`."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def printable(text: str) -> str:
    """The text with control characters (terminal escapes) shown as `\\xNN`; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def body_text(body: bytes) -> tuple[str, str]:
    """(`utf-8` or `hex`, the body as text): text when it decodes as UTF-8, else hex."""
    try:
        return "utf-8", printable(body.decode("utf-8"))
    except UnicodeDecodeError:
        return "hex", body.hex()


def decode_fields(fields: Mapping[str, str]) -> dict[bytes, bytes]:
    """A Redis entry's fields as stored (`{k.hex(): v.hex()}`), decoded."""
    try:
        return {bytes.fromhex(k): bytes.fromhex(v) for k, v in fields.items()}
    except ValueError as exc:
        raise DeadLetterError(f"the stored Redis fields are not hex-encoded: {exc}") from exc


# --- replay: what goes back on the wire (pure) -------------------------------------------------------


def is_failure_header(key: str | bytes) -> bool:
    """True for a header (or Redis field) the failure and retry path added."""
    name = (key.decode("utf-8", "replace") if isinstance(key, bytes) else key).lower()
    return name in FAILURE_HEADERS or name.startswith(FAILURE_HEADER_PREFIXES)


def replay_headers(headers: Mapping[str, Any], dead_letter_id: int) -> dict[str, Any]:
    """The original headers without failure and retry headers, plus `x-replayed-from`."""
    kept = {k: v for k, v in headers.items() if not is_failure_header(k)}
    kept[H_REPLAYED_FROM] = str(dead_letter_id)
    return kept


@dataclass(frozen=True, slots=True)
class RabbitReplay:
    """A replayed RabbitMQ message: default exchange, routing key = the original queue, persistent."""

    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str
    content_type: str | None
    headers: dict[str, Any]


def rabbit_replay(letter: DeadLetter) -> RabbitReplay:
    """The RabbitMQ message that replays `letter`: body untouched, ids kept, failure headers gone."""
    content_type = letter.headers.get("content-type")
    return RabbitReplay(
        routing_key=letter.queue,
        body=letter.body,
        message_id=letter.message_id,
        correlation_id=letter.correlation_id,
        content_type=str(content_type) if content_type else None,
        headers=replay_headers(letter.headers, letter.id),
    )


async def redis_entry(letter: DeadLetter) -> dict[bytes, bytes]:
    """The Redis entry that replays `letter`: its fields verbatim, minus failure fields, ids kept.

    A FastStream entry keeps its body bytes; only the headers inside its `__data__` envelope
    change. A plain entry (no `__data__`) gets its ids and `x-replayed-from` as fields.
    """
    if letter.fields is None:  # never written by the pipeline, but the row has all we need
        source = {DATA_KEY: await _envelope(letter.body, letter.headers, letter)}
    else:
        source = decode_fields(letter.fields)
    entry = {k: v for k, v in source.items() if not is_failure_header(k)}
    data = entry.get(DATA_KEY)
    if data is not None:
        body, headers = BinaryMessageFormatV1.parse(data)
        entry[DATA_KEY] = await _envelope(body, headers, letter)
        return entry
    entry.setdefault(names.H_MESSAGE_ID.encode(), letter.message_id.encode())
    entry.setdefault(names.H_CORRELATION_ID.encode(), letter.correlation_id.encode())
    entry[H_REPLAYED_FROM.encode()] = str(letter.id).encode()
    return entry


async def _envelope(body: bytes, headers: Mapping[str, Any], letter: DeadLetter) -> bytes:
    kept = replay_headers(headers, letter.id)
    # Without any id the message id was derived from the old entry id: pin it as a header.
    kept.setdefault(names.H_MESSAGE_ID, letter.message_id)
    correlation_id = str(kept.get("correlation_id") or letter.correlation_id)
    return await BinaryMessageFormatV1.encode(
        message=body, reply_to=None, headers={k: str(v) for k, v in kept.items()}, correlation_id=correlation_id
    )


class Throttle:
    """Lets at most `rate` calls of `wait()` through per second (no limit when `rate` is None)."""

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.clock = clock
        self.sleep = sleep
        self._next: float | None = None

    async def wait(self) -> None:
        """Return when the next call is allowed."""
        if not self.interval:
            return
        now = self.clock()
        if self._next is not None and self._next > now:
            await self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


# --- the review store ------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def reason(exc: BaseException) -> str:
    """An exception as one line, passwords masked."""
    text = str(exc).strip() or repr(exc.__context__ or exc)
    return redact(" ".join(text.split()))


def _missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file `url` names when it does not exist (connecting would create it)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return None if path.exists() else path


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[AsyncEngine]:
    """The engine of the review store at `url`; fails without creating anything when it is not there."""
    shown = mask_url(url)
    if (missing := _missing_sqlite_file(url)) is not None:
        raise StoreError(f"the database file {missing} does not exist (PIPELINE_DATABASE_URL={shown})")
    store = EventStore(url)
    try:
        try:
            async with store.engine.connect() as conn:
                present = await conn.run_sync(lambda c: inspect(c).has_table(dead_letters.name))
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot read the database at {shown}: {reason(exc)}") from exc
        if not present:
            raise StoreError(f"the database at {shown} has no {dead_letters.name} table: no worker has used it yet")
        yield store.engine
    finally:
        await store.close()


async def _rows(engine: AsyncEngine, query: Select[Any]) -> list[DeadLetter]:
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot read dead letters: {reason(exc)}") from exc
    return [DeadLetter.from_row(r) for r in rows]


async def list_letters(engine: AsyncEngine, selection: Selection, limit: int) -> list[DeadLetter]:
    """Matching dead letters, newest first, at most `limit`."""
    query = selection.apply(select(dead_letters))
    query = query.order_by(dead_letters.c.dead_lettered_at.desc(), dead_letters.c.id.desc()).limit(limit)
    return await _rows(engine, query)


async def count_letters(engine: AsyncEngine, selection: Selection) -> int:
    """How many dead letters match."""
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(selection.apply(select(func.count()).select_from(dead_letters))) or 0)
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot read dead letters: {reason(exc)}") from exc


async def get_letter(engine: AsyncEngine, dead_letter_id: int) -> DeadLetter | None:
    """One dead letter, or None when there is no such id."""
    rows = await _rows(engine, select(dead_letters).where(dead_letters.c.id == dead_letter_id))
    return rows[0] if rows else None


async def letters_to_replay(engine: AsyncEngine, selection: Selection) -> list[DeadLetter]:
    """Matching dead letters in the order they were dead-lettered."""
    return await _rows(engine, selection.apply(select(dead_letters)).order_by(dead_letters.c.id))


async def mark_replayed(engine: AsyncEngine, dead_letter_id: int, when: datetime | None = None) -> None:
    """Record that a dead letter was put back on its queue."""
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(dead_letters)
                .where(dead_letters.c.id == dead_letter_id)
                .values(replayed_at=when or datetime.now(UTC))
            )
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(
            f"dead letter {dead_letter_id} was replayed but could not be marked so: {reason(exc)}"
        ) from exc


async def plan_purge(engine: AsyncEngine, selection: Selection) -> PurgePlan:
    """What `purge` would delete, counted per transport, queue and kind."""
    c = dead_letters.c
    query = selection.apply(
        select(c.transport, c.queue, c.kind, func.count().label("n"), func.max(c.id).label("max_id"))
    ).group_by(c.transport, c.queue, c.kind)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(query.order_by(c.transport, c.queue, c.kind))).all()
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot read dead letters: {reason(exc)}") from exc
    groups = tuple(PurgeGroup(r.transport, r.queue, r.kind, int(r.n)) for r in rows)
    return PurgePlan(selection, groups, max((int(r.max_id) for r in rows), default=0))


async def purge(engine: AsyncEngine, plan: PurgePlan) -> int:
    """Delete the rows the plan described (none that arrived after it); returns how many."""
    query = plan.selection.apply(select(dead_letters.c.id)).where(dead_letters.c.id <= plan.max_id)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(delete(dead_letters).where(dead_letters.c.id.in_(query.scalar_subquery())))
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot delete dead letters: {reason(exc)}") from exc
    return int(result.rowcount)


# --- replay through the brokers -----------------------------------------------------------------------

Publish = Callable[[DeadLetter], Awaitable[str]]  # returns where the message went


async def replay(
    engine: AsyncEngine,
    letters: Sequence[DeadLetter],
    publish: Publish,
    *,
    throttle: Throttle | None = None,
    on_replayed: Callable[[DeadLetter, str], None] | None = None,
) -> int:
    """Publish each dead letter, then mark it replayed (one UPDATE each); stops at the first failure."""
    throttle = throttle or Throttle(None)
    for letter in letters:
        await throttle.wait()
        where = await publish(letter)
        await mark_replayed(engine, letter.id)
        if on_replayed is not None:
            on_replayed(letter, where)
    return len(letters)


class BrokerPublisher:
    """Replays dead letters on the real brokers; connects to each one the first time it is needed."""

    def __init__(self, rabbit_url: str, redis_url: str, timeout: float) -> None:
        self.rabbit_url = rabbit_url
        self.redis_url = redis_url
        self.timeout = timeout
        self._rabbit: Any = None  # aio_pika connection
        self._channel: Any = None
        self._redis: aioredis.Redis | None = None

    async def __call__(self, letter: DeadLetter) -> str:
        """Publish one dead letter where it first arrived; returns where that is."""
        if letter.transport == "rabbit":
            return await self._publish_rabbit(letter)
        if letter.transport == "redis":
            return await self._publish_redis(letter)
        raise DeadLetterError(f"dead letter {letter.id} has an unknown transport {letter.transport!r}")

    async def _publish_rabbit(self, letter: DeadLetter) -> str:
        msg = rabbit_replay(letter)
        where = f"RabbitMQ queue {msg.routing_key!r}"
        try:
            channel = await self._rabbit_channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    msg.body,
                    headers=msg.headers,
                    content_type=msg.content_type,
                    message_id=msg.message_id,
                    correlation_id=msg.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=msg.routing_key,
                mandatory=True,
                timeout=self.timeout,
            )
        except aiormq.exceptions.PublishError as exc:  # basic.return: no such queue
            raise BrokerError(f"RabbitMQ returned dead letter {letter.id}: there is no queue {letter.queue!r}") from exc
        except TimeoutError as exc:
            raise BrokerError(
                f"no confirm from RabbitMQ for dead letter {letter.id} within {self.timeout:g}s; "
                "it may have arrived anyway, it is not marked replayed"
            ) from exc
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError) as exc:
            raise BrokerError(f"cannot replay dead letter {letter.id} to {where}: {reason(exc)}") from exc
        return where

    async def _rabbit_channel(self) -> Any:
        if self._channel is None:
            try:
                self._rabbit = await aio_pika.connect(self.rabbit_url, timeout=self.timeout)
                # Confirms on: a publish returns once RabbitMQ has the message; a returned one raises.
                self._channel = await self._rabbit.channel(publisher_confirms=True, on_return_raises=True)
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                raise BrokerError(f"cannot connect to RabbitMQ at {mask_url(self.rabbit_url)}: {reason(exc)}") from exc
        return self._channel

    async def _publish_redis(self, letter: DeadLetter) -> str:
        entry = await redis_entry(letter)
        where = f"Redis stream {letter.queue!r}"
        if self._redis is None:
            self._redis = aioredis.from_url(
                self.redis_url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout
            )
        try:
            entry_id = await self._redis.xadd(letter.queue, entry)  # type: ignore[arg-type]
        except (RedisError, OSError, TimeoutError) as exc:
            shown = mask_url(self.redis_url)
            raise BrokerError(f"cannot replay dead letter {letter.id} to {where} at {shown}: {reason(exc)}") from exc
        entry_text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return f"{where} (entry {entry_text})"

    async def close(self) -> None:
        """Close whatever connections were opened."""
        if self._rabbit is not None:
            await self._rabbit.close()
        if self._redis is not None:
            await self._redis.aclose()


@asynccontextmanager
async def broker_publisher(rabbit_url: str, redis_url: str, io_timeout: float) -> AsyncIterator[Publish]:
    """A `Publish` on the real brokers, closed afterwards."""
    publisher = BrokerPublisher(rabbit_url, redis_url, io_timeout)
    try:
        yield publisher
    finally:
        await publisher.close()


# --- the brokers' own dead-letter queues --------------------------------------------------------------


async def broker_dlqs(
    targets: Sequence[tuple[str, str]], rabbit_url: str, redis_url: str, io_timeout: float, *, purge: bool
) -> dict[tuple[str, str], int | None]:
    """Messages in each (transport, dead-letter queue or stream); None when it does not exist.

    With `purge`, each one is emptied and the count is how many messages it lost.
    """
    result: dict[tuple[str, str], int | None] = {}
    rabbit = [name for transport, name in targets if transport == "rabbit"]
    if rabbit:
        sizes = await _rabbit_dlqs(rabbit, rabbit_url, io_timeout, purge)
        result.update({("rabbit", k): v for k, v in sizes.items()})
    streams = [name for transport, name in targets if transport == "redis"]
    if streams:
        sizes = await _redis_dlqs(streams, redis_url, io_timeout, purge)
        result.update({("redis", k): v for k, v in sizes.items()})
    return result


async def _rabbit_dlqs(queues: Sequence[str], url: str, io_timeout: float, purge: bool) -> dict[str, int | None]:
    sizes: dict[str, int | None] = {}
    try:
        async with await aio_pika.connect(url, timeout=io_timeout) as conn:
            for name in queues:
                # A passive declare of a missing queue closes its channel: one channel per queue.
                async with await conn.channel() as channel:
                    try:
                        queue = await channel.declare_queue(name, passive=True, timeout=io_timeout)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        sizes[name] = None
                        continue
                    if purge:
                        sizes[name] = (await queue.purge(timeout=io_timeout)).message_count or 0
                    else:
                        sizes[name] = queue.declaration_result.message_count or 0
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise BrokerError(f"cannot reach RabbitMQ at {mask_url(url)}: {reason(exc)}") from exc
    return sizes


async def _redis_dlqs(streams: Sequence[str], url: str, io_timeout: float, purge: bool) -> dict[str, int | None]:
    client = aioredis.from_url(url, socket_connect_timeout=io_timeout, socket_timeout=io_timeout)
    sizes: dict[str, int | None] = {}
    try:
        for name in streams:
            if not await client.exists(name):
                sizes[name] = None
            elif purge:
                sizes[name] = int(await client.xtrim(name, maxlen=0, approximate=False))
            else:
                sizes[name] = int(await client.xlen(name))
    except (RedisError, OSError, TimeoutError) as exc:
        raise BrokerError(f"cannot reach Redis at {mask_url(url)}: {reason(exc)}") from exc
    finally:
        await client.aclose()
    return sizes
