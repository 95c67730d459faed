"""The event store: an append-only `events` log and the dead letters kept for review (SQLAlchemy 2 async)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from handlers.errors import TransientError
from schemas import Event
from streams.envelope import Envelope
from streams.failures import Failure

metadata = MetaData()

# BigInteger ids autoincrement on PostgreSQL; SQLite only does so for INTEGER PRIMARY KEY.
_Position = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "events",
    metadata,
    Column("position", _Position, primary_key=True, autoincrement=True, comment="global order"),
    Column("stream_id", String(300), nullable=False),
    Column("version", Integer, nullable=False),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("data", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
    Index("ix_events_type", "type"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", _Position, primary_key=True, autoincrement=True),
    Column("transport", String(16), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("message_id", String(256), nullable=False),
    Column("correlation_id", String(256), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("exception_type", String(255), nullable=False),
    Column("exception_message", Text, nullable=False),
    Column("stacktrace", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("fields", JSON, nullable=True, comment="Redis entry fields, hex-encoded"),
    Column("dead_lettered_at", DateTime(timezone=True), nullable=False),
    Column("replayed_at", DateTime(timezone=True), nullable=True),
    Index("ix_dead_letters_queue_kind", "queue", "kind"),
)


class ConcurrencyError(TransientError):
    """Raised when another writer appended to the same stream at the same version first."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One row of the log."""

    position: int
    stream_id: str
    version: int
    event_id: str
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class TaskView:
    """A completion task's status, folded from its events."""

    task_id: str
    status: str
    result: str | None
    reason: str | None
    events: int


def fold_task(task_id: str, history: Sequence[StoredEvent]) -> TaskView:
    """Completion task status as a fold over its events (pure)."""
    status, result, reason = "requested", None, None
    for ev in history:
        if ev.type == "completion.succeeded":
            status, result = "succeeded", ev.data.get("completion")
        elif ev.type == "completion.failed":
            status, reason = "failed", ev.data.get("reason")
        elif ev.type == "message.dead_lettered":
            # A valid command that failed for good is `failed` (and parked); otherwise parked.
            if status not in {"succeeded", "failed"}:
                status = "dead-lettered"
            reason = reason or ev.data.get("exception_message")
    return TaskView(task_id, status, result, reason, len(history))


class EventStore:
    """Appends events and dead letters; answers queries over them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    async def start(self) -> None:
        """Create the tables if missing (Alembic migrations arrive with the full store)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def close(self) -> None:
        """Release every connection."""
        await self.engine.dispose()

    async def ping(self) -> bool:
        """True when the database answers."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    async def append(self, stream_id: str, evts: Sequence[Event], env: Envelope) -> None:
        """Append events to one stream, in one transaction, at the next versions."""
        now = datetime.now(UTC)
        try:
            async with self.engine.begin() as conn:
                current = await conn.scalar(
                    select(func.coalesce(func.max(events.c.version), 0)).where(events.c.stream_id == stream_id)
                )
                version = int(current or 0)
                for ev in evts:
                    version += 1
                    await self._append_one(conn, stream_id, version, ev, env, now)
        except IntegrityError as exc:
            raise ConcurrencyError(f"concurrent append to {stream_id}: {exc.orig}") from exc

    @staticmethod
    async def _append_one(
        conn: AsyncConnection, stream_id: str, version: int, ev: Event, env: Envelope, now: datetime
    ) -> None:
        await conn.execute(
            insert(events).values(
                stream_id=stream_id,
                version=version,
                event_id=ev.event_id,
                type=ev.TYPE,
                data=ev.model_dump(mode="json"),
                metadata={
                    "message_id": env.message_id,
                    "correlation_id": env.correlation_id,
                    "causation_id": env.message_id,
                    "attempt": env.attempt,
                    "source": f"{env.transport}:{env.source}",
                },
                recorded_at=now,
            )
        )

    async def record_dead_letter(self, env: Envelope, failure: Failure) -> int:
        """Keep a dead letter for review and replay; returns its id."""
        fields = {k.hex(): v.hex() for k, v in env.fields.items()} if env.fields is not None else None
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(dead_letters)
                .values(
                    transport=env.transport,
                    queue=env.source,
                    message_id=env.message_id,
                    correlation_id=env.correlation_id,
                    kind=failure.kind.value,
                    exception_type=failure.exception_type,
                    exception_message=failure.exception_message,
                    stacktrace=failure.stacktrace,
                    attempts=failure.attempts,
                    headers=json.loads(json.dumps(env.headers, default=str)),
                    body=env.body,
                    fields=fields,
                    dead_lettered_at=failure.last_failure_at,
                )
                .returning(dead_letters.c.id)
            )
            return int(result.scalar_one())

    async def read(
        self, *, stream_id: str | None = None, type_: str | None = None, after: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        """Events in global order, optionally of one stream or type."""
        query = select(events).where(events.c.position > after).order_by(events.c.position).limit(limit)
        if stream_id is not None:
            query = query.where(events.c.stream_id == stream_id)
        if type_ is not None:
            query = query.where(events.c.type == type_)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [StoredEvent(**dict(r)) for r in rows]

    async def task(self, task_id: str) -> TaskView | None:
        """A completion task's status and result, or None when the store never saw it."""
        history = await self.read(stream_id=f"completion-{task_id}")
        return fold_task(task_id, history) if history else None


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
