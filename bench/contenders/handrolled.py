"""The store of the hand-rolled contenders (h) and (i): the pipeline's job as a team would write it
on FastStream and SQLAlchemy 2, without group commit, batching or a relay.

Per message: one `AsyncSession` transaction (is the message id in `inbox`? if not: an `inbox`
row, an `events` row and an `outbox` row), commit; the outcome published through FastStream by
the caller; then the outbox row marked published in a second small transaction. SQLite through
aiosqlite, a fresh file in a temporary directory per run.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

from sqlalchemy import JSON, DateTime, ForeignKey, String, UniqueConstraint, event, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schemas import EmailSent, SendEmail

CONSUMER = "bench-handrolled"
EMAIL_SENT = EmailSent.TYPE
# Where the outcomes go. RabbitMQ: a topic exchange with a classic, non-durable queue bound to
# `email.sent` (as the pipeline's outcome probe on `events`), emptied before each run. Redis: a
# stream, deleted before each run.
RABBIT_EXCHANGE = "bench.handrolled.events"
RABBIT_OUTCOMES = "bench.handrolled.outcomes"
REDIS_STREAM = "bench.handrolled.events"
# `wal`: the pipeline's own SQLite settings (journal_mode=WAL, synchronous=NORMAL), so that the
# comparison is of the design, not of fsyncs; `default`: SQLite's defaults (rollback journal,
# synchronous=FULL), as a team that sets nothing gets them.
SQLITE_MODES = ("wal", "default")


class Base(DeclarativeBase):
    """The hand-rolled contender's tables."""


class Inbox(Base):
    """Messages already handled, per consumer: the idempotency check."""

    __tablename__ = "inbox"
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    handled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StoredEvent(Base):
    """The append-only event log."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("stream_id", "version"),)
    position: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    stream_id: Mapped[str] = mapped_column(String(300))
    version: Mapped[int]
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Outbox(Base):
    """Outcome events to publish, and whether they were."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.event_id"))
    destination: Mapped[str] = mapped_column(String(300))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


def _wal(dbapi_conn: Any, _: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


# Publishes an outbox row's event through FastStream: (row, correlation id, headers).
Publish: TypeAlias = Callable[["Outbox", str, dict[str, Any]], Awaitable[Any]]


class Store:
    """One transaction a message, one more to mark its outbox row."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.session = async_sessionmaker(engine, expire_on_commit=False)

    async def record(self, message_id: str, correlation_id: str, cmd: SendEmail) -> Outbox | None:
        """Inbox check, event and outbox rows, commit; the outbox row, or None for a duplicate."""
        async with self.session() as session, session.begin():
            if await session.get(Inbox, (CONSUMER, message_id)) is not None:
                return None
            outcome = EmailSent(message_id=message_id, correlation_id=correlation_id, to=cmd.to, subject=cmd.subject)
            data = outcome.model_dump(mode="json")
            outbox = Outbox(event_id=outcome.event_id, destination=EMAIL_SENT, payload=data)
            session.add(Inbox(consumer=CONSUMER, message_id=message_id, handled_at=outcome.occurred_at))
            session.add(
                StoredEvent(
                    stream_id=f"email-{message_id}",
                    version=1,
                    event_id=outcome.event_id,
                    type=EMAIL_SENT,
                    data=data,
                    meta={"message_id": message_id, "correlation_id": correlation_id, "causation_id": message_id},
                    occurred_at=outcome.occurred_at,
                )
            )
            session.add(outbox)
        return outbox

    async def handle(self, message_id: str, correlation_id: str, cmd: SendEmail, publish: Publish) -> None:
        """The whole job of one message: record it, publish its outcome through FastStream, mark it."""
        outbox = await self.record(message_id, correlation_id, cmd)
        if outbox is not None:
            await publish(outbox, correlation_id, {"event-type": EMAIL_SENT, "message-id": message_id})
            await self.mark_published(outbox)

    async def mark_published(self, outbox: Outbox) -> None:
        """The outbox row was published."""
        async with self.session() as session, session.begin():
            await session.execute(update(Outbox).where(Outbox.id == outbox.id).values(published_at=datetime.now(UTC)))


@contextlib.asynccontextmanager
async def fresh_store(mode: str = "wal") -> AsyncIterator[Store]:
    """A store on a new SQLite file, its tables created; the file is deleted afterwards."""
    if mode not in SQLITE_MODES:
        raise ValueError(f"SQLite mode {mode!r}: one of {SQLITE_MODES}")
    with tempfile.TemporaryDirectory(prefix="bench-handrolled-") as tmp:
        engine = create_async_engine(f"sqlite+aiosqlite:///{Path(tmp) / 'handrolled.db'}")
        if mode == "wal":
            event.listen(engine.sync_engine, "connect", _wal)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            yield Store(engine)
        finally:
            await engine.dispose()
