"""The event store: append-only log, inbox, outbox and dead letters, written by group commit.

One `Commit` is everything one message changes: its events (appended to one stream at the next
versions), the inbox entry that makes handling idempotent, the outbox rows that the relay
publishes, the dead letter kept for review, and the live projections. All of it lands in one
transaction, shared with whatever other messages committed at the same moment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, TypeVar, cast

import asyncpg
import orjson
from sqlalchemy import event, func, make_url, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from handlers.errors import TransientError
from schemas import Event
from streams.core import metrics
from streams.core.committer import GroupCommitter
from streams.core.envelope import Envelope
from streams.core.logging import get_logger
from streams.core.periodic import Periodic, cancel_and_wait
from streams.eventstore import projections
from streams.eventstore.sql import AsyncpgStatements, CoreStatements, SqliteStatements, Statements, json_dumps
from streams.eventstore.tables import dead_letters, email_log, events, inbox, metadata, outbox, task_status
from streams.policy.failures import Failure

log = get_logger("pipeline.store")
T = TypeVar("T")

# PostgreSQL group-commit transactions open at once. One writer leaves the others' messages
# waiting through its round trips; two overlap them. More make smaller transactions that cost the
# server more CPU than the overlap saves.
PG_COMMIT_WRITERS = 2
# Connections of the PostgreSQL hot path: the group commit's writers, inbox reads and the relay,
# plus one spare.
PG_HOT_CONNECTIONS = PG_COMMIT_WRITERS + 3

# PostgreSQL plans the hot path's lookups from table statistics, which autovacuum refreshes at
# most once a naptime (a minute by default). A table that grew since (a new store: no statistics
# at all) is planned as a small one: the inbox lookup reads every row of its consumer, the e-mail
# projection's read the whole `email_log`, each slower as the table grows. The store analyzes its
# own tables when they changed by autovacuum's measure, every few seconds.
ANALYZE_SECONDS = 2.0
ANALYZE_THRESHOLD = 50  # rows changed, plus ANALYZE_SCALE of the table (autovacuum's defaults)
ANALYZE_SCALE = 0.1

# How often the SQLite WAL is copied into the database file, off the loop (`Checkpointer`).
CHECKPOINT_SECONDS = 0.5
WAL_RESET_BYTES = 64 * 1024 * 1024  # a WAL past this is emptied (a TRUNCATE checkpoint)

# Outbox rows the relay published wait at most this long to be marked in the next group commit's
# transaction before they are marked in one of their own (`mark_published_soon`).
MARK_DELAY = 0.1


class ConcurrencyError(TransientError):
    """Raised when another writer appended to the same stream at the same version first."""


class Outcome(StrEnum):
    """What became of a commit."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the inbox already held (consumer, message id): nothing was written


@dataclass(frozen=True, slots=True)
class Commit:
    """Everything one message changes, written atomically."""

    stream_id: str
    events: Sequence[Event]
    env: Envelope
    publish: bool = True  # also put the events in the outbox
    consumer: str | None = None  # inbox key with env.message_id; None: no idempotency entry
    dead_letter: Failure | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """The result of one commit."""

    outcome: Outcome
    dead_letter_id: int | None = None


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
class PendingEvent:
    """An outbox row waiting to be published."""

    id: int
    event_id: str
    transport: str
    event_type: str
    payload: bytes
    message_id: str
    correlation_id: str


@dataclass
class _Plan:
    """Rows of one batch, built before the transaction opens."""

    results: list[Committed] = field(default_factory=list)
    inbox: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    pending: list[PendingEvent] = field(default_factory=list)  # the outbox rows, as the relay takes them


class OutboxListener(Protocol):
    """Learns of outbox rows around their commit (the relay, which publishes them from memory)."""

    def reserve(self, rows: Sequence[PendingEvent]) -> None:
        """These rows are about to be committed."""
        ...

    def committed(self, rows: Sequence[PendingEvent]) -> None:
        """These rows are committed: publish them."""
        ...

    def abandon(self, rows: Sequence[PendingEvent]) -> None:
        """These rows were not committed."""
        ...


class EventStore:
    """SQLite (WAL) by default, PostgreSQL via asyncpg; concurrent commits share transactions."""

    def __init__(self, url: str, *, owner: str = "worker", max_batch: int = 256, max_wait: float = 0.0) -> None:
        self.url = url
        self.owner = owner
        self.engine: AsyncEngine = create_async_engine(
            url, pool_pre_ping=True, json_serializer=json_dumps, json_deserializer=orjson.loads
        )
        # SQLite's hot path (group commit, inbox reads, the outbox) runs inline on the event loop,
        # on a sqlite3 connection of its own (`streams.eventstore.sql.SqliteStatements`): a statement
        # costs far less than its hand-off to aiosqlite's thread and back, and than the GIL
        # contention with that thread.
        # PostgreSQL is asynchronous by nature: its hot path runs on an asyncpg pool of its own (`_pg_pool`).
        self._sqlite_path: str | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._write_lock: asyncio.Lock | None = None
        self._write_lock_loop: asyncio.AbstractEventLoop | None = None
        self.analyzer: Analyzer | None = None
        self._pg_pool: asyncpg.Pool | None = None
        self._pg_opening = asyncio.Lock()
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            self._sqlite_path = make_url(url).database or ":memory:"
        self.outbox_listener: OutboxListener | None = None
        # SQLite has one writer at a time anyway; PostgreSQL's commits overlap, one stream per writer.
        writers = PG_COMMIT_WRITERS if self.engine.dialect.name == "postgresql" else 1
        self.committer: GroupCommitter[Commit, Committed] = GroupCommitter(
            self._write, max_batch, max_wait, writers=writers, partition=lambda unit: unit.stream_id
        )
        # Inbox lookups of concurrent messages share one query the same way.
        self.inbox_reader: GroupCommitter[tuple[str, str], bool] = GroupCommitter(self._seen_many, max_batch)
        # Event ids published but not yet marked: the next group commit marks them in its transaction.
        self._unmarked: list[str] = []
        self._mark_timer: asyncio.TimerHandle | None = None
        self._mark_timer_loop: asyncio.AbstractEventLoop | None = None
        self._mark_tasks: set[asyncio.Task[None]] = set()

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, *, create: bool = True) -> None:
        """Create missing tables (tests and first runs) and start group commit."""
        if create:
            async with self.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
        self.committer.start()
        self.inbox_reader.start()
        if self._sqlite_path is not None and self._checkpointer is None:
            self._checkpointer = Checkpointer(self._sqlite_path)
            self._checkpointer.start()
        if self.engine.dialect.driver == "asyncpg" and self.analyzer is None:
            self.analyzer = Analyzer(self._pg, [t.name for t in metadata.sorted_tables], interval=ANALYZE_SECONDS)
            self.analyzer.start()

    async def close(self) -> None:
        """Finish queued commits and release every connection."""
        await self.inbox_reader.stop()
        await self.committer.stop()
        if self.analyzer is not None:
            await self.analyzer.stop()
            self.analyzer = None
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        for task in list(self._mark_tasks):
            await cancel_and_wait(task)
        try:
            await self.flush_marks()
        except Exception as exc:  # noqa: BLE001 - the rows stay unpublished in the table: published again, deduped
            log.warning("published outbox rows not marked at close", rows=len(self._unmarked), error=repr(exc))
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        await self.engine.dispose()
        if self._pg_pool is not None:
            await self._pg_pool.close()
            self._pg_pool = None
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    @contextlib.asynccontextmanager
    async def _hot(self, *, transaction: bool) -> AsyncIterator[Statements]:
        """The hot path's statements, in a transaction or for reads: inline on SQLite,
        asynchronous on PostgreSQL."""
        if self._sqlite_path is None:
            if self.engine.dialect.driver == "asyncpg":
                pool = await self._pg()
                async with pool.acquire() as pg:
                    try:
                        async with pg.transaction() if transaction else contextlib.nullcontext():
                            yield AsyncpgStatements(pg)
                    except _DROPPED:
                        # The server dropped this one, and most likely its siblings (a restart):
                        # none of them goes back into use; the pool opens fresh ones.
                        pg.terminate()
                        await pool.expire_connections()
                        raise
                return
            async with self.engine.begin() if transaction else self.engine.connect() as aconn:
                yield CoreStatements(aconn)
            return
        db = self._sqlite_connection()
        if not transaction:
            yield SqliteStatements(db)
            return
        async with self._sqlite_writer():
            db.execute("BEGIN IMMEDIATE")  # the write lock first: reads then writes cannot deadlock
            try:
                yield SqliteStatements(db)
                # Inside: a COMMIT that fails (the disk full) would leave the transaction open, and
                # every later BEGIN would fail until the worker restarted.
                db.execute("COMMIT")
            except BaseException:
                self._rollback(db)
                raise
            checkpointer = self._checkpointer
            if checkpointer is not None and checkpointer.rewind.is_set():
                checkpointer.rewind.clear()
                # Another thread empties the WAL while this process's writers wait (here, holding the
                # lock): the loop runs on, and commits queue up into the next batch.
                await asyncio.to_thread(checkpointer.truncate)

    def _sqlite_writer(self) -> asyncio.Lock:
        """One write transaction at a time on the SQLite connection, and none while the WAL is emptied."""
        loop = asyncio.get_running_loop()
        if self._write_lock is None or self._write_lock_loop is not loop:
            self._write_lock, self._write_lock_loop = asyncio.Lock(), loop
        return self._write_lock

    async def _pg(self) -> asyncpg.Pool:
        """The hot path's own asyncpg pool (made on first use, on the running loop).

        Not SQLAlchemy's: its checkout (a greenlet, a pre-ping round trip) and check-in cost more
        CPU than the statements of a small transaction. asyncpg's pool without its reset query
        costs no round trip; a connection that broke is dropped at release and replaced.
        """
        if self._pg_pool is None:
            async with self._pg_opening:
                if self._pg_pool is None:
                    dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
                    self._pg_pool = await asyncpg.create_pool(
                        dsn, min_size=1, max_size=PG_HOT_CONNECTIONS, reset=_keep_session
                    )
        return self._pg_pool

    def _sqlite_connection(self) -> sqlite3.Connection:
        if self._sqlite is None:
            assert self._sqlite_path is not None
            # isolation_level=None: no implicit transactions, `_hot` says BEGIN and COMMIT itself.
            db = sqlite3.connect(self._sqlite_path, isolation_level=None, check_same_thread=False)
            _sqlite_pragmas(db, None)
            if self._checkpointer is not None:
                # Its COMMITs would checkpoint every 1,000 pages, on the loop, with an fsync of
                # the database file that stops the loop. The checkpointer's thread does it instead.
                db.execute("PRAGMA wal_autocheckpoint=0")
            self._sqlite = db
        return self._sqlite

    def _rollback(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:  # the connection is unusable (or no transaction is open): start afresh
            db.close()
            self._sqlite = None

    async def ping(self) -> bool:
        """True when the database answers."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    # -- writing ---------------------------------------------------------------------------

    async def seen(self, consumer: str, message_id: str) -> bool:
        """True when `consumer` already committed the outcome of `message_id`."""
        return await self.inbox_reader.submit((consumer, message_id))

    async def _seen_many(self, keys: Sequence[tuple[str, str]]) -> list[bool]:
        async def read() -> set[tuple[str, str]]:
            async with self._hot(transaction=False) as sql:
                return await sql.inbox_has(keys)

        found = await _again_if_dropped(read)
        return [key in found for key in keys]

    async def seen_many(self, consumer: str, message_ids: Sequence[str]) -> list[bool]:
        """`seen` for several messages, in one query (shared with concurrent lookups)."""
        keys = [(consumer, m) for m in message_ids]
        if not self.inbox_reader.started or self._sqlite_path is not None:
            # SQLite reads inline on the loop: a shared query saves little there, and the hop to the
            # reader costs a future and a queue round a message.
            return await self._seen_many(keys)
        seen = await self.inbox_reader.submit_many(keys)
        for answer in seen:
            if isinstance(answer, BaseException):
                raise answer
        return cast(list[bool], seen)

    async def commit_many(self, units: Sequence[Commit]) -> list[Committed | BaseException]:
        """Several messages' changes, in transactions shared as `commit`; each result or its error."""
        return await self.committer.submit_many(units)

    async def commit(self, unit: Commit) -> Committed:
        """Write one message's changes, in a transaction shared with concurrent commits."""
        return await self.committer.submit(unit)

    async def record_dead_letter(self, env: Envelope, failure: Failure) -> int:
        """Keep a dead letter for review, on its own (no events); returns its id."""
        done = await self.commit(Commit(f"deadletter-{env.message_id}", (), env, publish=False, dead_letter=failure))
        assert done.dead_letter_id is not None
        return done.dead_letter_id

    def listen(self, listener: OutboxListener) -> None:
        """Tell `listener` of the outbox rows this store writes, around their commit."""
        self.outbox_listener = listener

    async def _write(self, units: Sequence[Commit]) -> list[Committed]:
        metrics.STORE_BATCH.observe(len(units))
        return await _again_if_dropped(lambda: self._write_once(units))

    async def _write_once(self, units: Sequence[Commit]) -> list[Committed]:
        listener = self.outbox_listener
        plan = _Plan()
        marks, self._unmarked = self._unmarked, []  # rows published meanwhile: marked in this transaction
        try:
            async with self._hot(transaction=True) as conn:
                if marks:
                    await conn.mark_published(marks, datetime.now(UTC))
                await self._write_in(conn, units, plan)
                if listener is not None:
                    listener.reserve(plan.pending)  # before the commit: no outbox read may take them
        except (IntegrityError, sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError) as exc:
            self._unmarked[:0] = marks
            if listener is not None:
                listener.abandon(plan.pending)
            if len(units) == 1 and _is_inbox_conflict(exc):
                return [Committed(Outcome.DUPLICATE)]
            raise ConcurrencyError(f"concurrent write: {_reason(exc)}") from exc
        except BaseException:
            self._unmarked[:0] = marks
            if listener is not None:
                listener.abandon(plan.pending)
            raise
        if listener is not None:
            listener.committed(plan.pending)
        return plan.results

    async def _write_in(self, sql: Statements, units: Sequence[Commit], plan: _Plan) -> None:
        now = datetime.now(UTC)
        duplicates = await sql.inbox_has([(u.consumer, u.env.message_id) for u in units if u.consumer is not None])
        versions = await sql.versions({u.stream_id for u in units})
        claimed: set[tuple[str, str]] = set()
        for unit in units:
            key = (unit.consumer or "", unit.env.message_id)
            if unit.consumer is not None and (key in duplicates or key in claimed):
                plan.results.append(Committed(Outcome.DUPLICATE))
                continue
            if unit.consumer is not None:
                claimed.add(key)
                plan.inbox.append({"consumer": unit.consumer, "message_id": unit.env.message_id, "recorded_at": now})
            for ev in unit.events:
                versions[unit.stream_id] = versions.get(unit.stream_id, 0) + 1
                # Serialized once: the outbox payload, and the log's data parsed back from it.
                payload = ev.model_dump_json().encode()
                plan.events.append(_event_row(unit, ev, orjson.loads(payload), versions[unit.stream_id], now))
                if unit.publish:
                    plan.outbox.append(_outbox_row(unit, ev, payload, self.owner, now))
            dead_letter_id = None
            if unit.dead_letter is not None:
                dead_letter_id = await sql.insert_returning_id(
                    dead_letters, _dead_letter_row(unit.env, unit.dead_letter)
                )
            plan.results.append(Committed(Outcome.COMMITTED, dead_letter_id))
        await sql.insert(inbox, plan.inbox)
        if plan.events:
            # One executemany, then the positions by event id: RETURNING in parameter order makes
            # SQLAlchemy send SQLite one INSERT per row.
            await sql.insert(events, plan.events)
            position_of = await sql.positions([row["event_id"] for row in plan.events])
            await projections.apply(
                sql,
                [
                    projections.Recorded(position_of[row["event_id"]], row["stream_id"], row["type"], row["data"])
                    for row in plan.events
                ],
            )
        if plan.outbox:
            await sql.insert(outbox, plan.outbox)
            plan.pending = [
                PendingEvent(
                    0,
                    r["event_id"],
                    r["transport"],
                    r["event_type"],
                    r["payload"],
                    r["message_id"],
                    r["correlation_id"],
                )
                for r in plan.outbox
            ]

    # -- the outbox ------------------------------------------------------------------------

    async def claim_orphans(self, *, orphaned_after: float = 30.0) -> int:
        """Take over other workers' rows left unpublished longer than `orphaned_after`; returns how many.

        The rows become this worker's and young again, so exactly one relay takes each over (the
        UPDATE is atomic), and no other relay takes them from it while it publishes them.
        """
        now = datetime.now(UTC)

        async def claim() -> int:
            async with self._hot(transaction=True) as sql:
                return await sql.claim_orphans(self.owner, now - timedelta(seconds=orphaned_after), now)

        return await _again_if_dropped(claim)

    async def unpublished(self, *, limit: int = 500) -> list[PendingEvent]:
        """This worker's outbox rows to publish (its own and those it took over), oldest first."""
        await self.flush_marks()  # rows that went out are not read back as waiting

        async def read() -> list[tuple[Any, ...]]:
            async with self._hot(transaction=False) as sql:
                return await sql.unpublished(self.owner, limit, _PENDING_COLUMNS)

        return [PendingEvent(*row) for row in await _again_if_dropped(read)]

    async def mark_published(self, event_ids: Sequence[str]) -> None:
        """Record that the outbox rows of these events reached their broker."""
        if not event_ids:
            return

        async def mark() -> None:
            async with self._hot(transaction=True) as sql:
                await sql.mark_published(event_ids, datetime.now(UTC))

        await _again_if_dropped(mark)

    async def mark_published_soon(self, event_ids: Sequence[str]) -> None:
        """`mark_published`, in the next group commit's transaction rather than one of its own.

        The relay publishes a batch's outcomes right after its commit, and the next batch's commit
        follows within milliseconds under load: marking in it saves a transaction a batch (a
        BEGIN and a COMMIT with its WAL write on SQLite, three round trips on PostgreSQL). When no
        commit comes within `MARK_DELAY`, the rows are marked on their own. Until then they stay
        unpublished in the table: every read of it (`unpublished`, `outbox_backlog`) marks them
        first, and a crash meanwhile publishes them once more, as a crash between a publish and
        its mark always could (consumers dedupe on `event_id`).
        """
        if not event_ids:
            return
        if not self.committer.started:
            await self.mark_published(event_ids)
            return
        self._unmarked.extend(event_ids)
        loop = asyncio.get_running_loop()
        if self._mark_timer is None or self._mark_timer_loop is not loop:
            self._mark_timer = loop.call_later(MARK_DELAY, self._marks_due)
            self._mark_timer_loop = loop

    def _marks_due(self) -> None:
        self._mark_timer = None
        if self._unmarked:
            task = asyncio.get_running_loop().create_task(self._mark_late(), name="outbox-marks")
            self._mark_tasks.add(task)
            task.add_done_callback(self._mark_tasks.discard)

    async def _mark_late(self) -> None:
        try:
            await self.flush_marks()
        except Exception as exc:  # noqa: BLE001 - kept; the next commit or the next round marks them
            log.warning("published outbox rows not marked yet", rows=len(self._unmarked), error=repr(exc))
            if self._mark_timer is None:
                self._mark_timer = asyncio.get_running_loop().call_later(CHECKPOINT_SECONDS * 2, self._marks_due)

    async def flush_marks(self) -> None:
        """Mark now what `mark_published_soon` holds (kept for the next try when it fails)."""
        marks, self._unmarked = self._unmarked, []
        try:
            await self.mark_published(marks)
        except BaseException:
            self._unmarked[:0] = marks
            raise

    async def outbox_backlog(self) -> tuple[int, float]:
        """Unpublished rows and the age in seconds of the oldest one."""
        await self.flush_marks()
        async with self.engine.connect() as conn:
            count, oldest = (
                await conn.execute(
                    select(func.count(), func.min(outbox.c.created_at)).where(outbox.c.published_at.is_(None))
                )
            ).one()
        if not oldest:
            return int(count), 0.0
        return int(count), (datetime.now(UTC) - _aware(oldest)).total_seconds()

    # -- reading ---------------------------------------------------------------------------

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
        return [StoredEvent(**{**dict(r), "recorded_at": _aware(r["recorded_at"])}) for r in rows]

    async def task(self, task_id: str) -> projections.TaskState | None:
        """A completion task's live status, or None when the store never saw it."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(task_status).where(task_status.c.task_id == task_id))).mappings().first()
        return projections.TaskState(**{k: row[k] for k in projections.TaskState.__dataclass_fields__}) if row else None

    async def email(self, message_id: str) -> projections.EmailState | None:
        """An e-mail command's live delivery record, or None."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(email_log).where(email_log.c.message_id == message_id))).mappings().first()
        return (
            projections.EmailState(**{k: row[k] for k in projections.EmailState.__dataclass_fields__}) if row else None
        )


# PostgreSQL closed the connection under a statement (a restart, an administrator): the pool
# hands out connections whose closed sockets the loop has not noticed yet, each fails once.
# A connection that read the server's "terminating connection" while idle can still be handed
# out, and fails with InternalClientError ("another operation is in progress").
_DROPPED = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionResetError,
)


async def _again_if_dropped(work: Callable[[], Awaitable[T]]) -> T:
    """`work()`, run again on a fresh connection while the ones it was given turn out to be dropped."""
    for _ in range(PG_HOT_CONNECTIONS):
        try:
            return await work()
        except _DROPPED as exc:
            log.warning("database connection dropped; trying again on another", error=repr(exc))
    return await work()


_PENDING_COLUMNS = ("id", "event_id", "transport", "event_type", "payload", "message_id", "correlation_id")


def _metadata(env: Envelope) -> dict[str, Any]:
    return {
        "message_id": env.message_id,
        "correlation_id": env.correlation_id,
        "causation_id": env.message_id,
        "attempt": env.attempt,
        "source": f"{env.transport}:{env.source}",
    }


def _event_row(unit: Commit, ev: Event, data: dict[str, Any], version: int, now: datetime) -> dict[str, Any]:
    return {
        "stream_id": unit.stream_id,
        "version": version,
        "event_id": ev.event_id,
        "type": ev.TYPE,
        "data": data,
        "metadata": _metadata(unit.env),
        "recorded_at": now,
    }


def _outbox_row(unit: Commit, ev: Event, payload: bytes, owner: str, now: datetime) -> dict[str, Any]:
    return {
        "event_id": ev.event_id,
        "transport": unit.env.transport,
        "event_type": ev.TYPE,
        "payload": payload,
        "message_id": ev.message_id,
        "correlation_id": ev.correlation_id,
        "owner": owner,
        "created_at": now,
        "published_at": None,
    }


def _dead_letter_row(env: Envelope, failure: Failure) -> dict[str, Any]:
    fields = {k.hex(): v.hex() for k, v in env.fields.items()} if env.fields is not None else None
    return {
        "transport": env.transport,
        "queue": env.source,
        "message_id": env.message_id,
        "correlation_id": env.correlation_id,
        "kind": failure.kind.value,
        "exception_type": failure.exception_type,
        "exception_message": failure.exception_message,
        "stacktrace": failure.stacktrace,
        "attempts": failure.attempts,
        "headers": json.loads(json.dumps(env.headers, default=str)),
        "body": env.body,
        "fields": fields,
        "dead_lettered_at": failure.last_failure_at,
    }


def _aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _reason(exc: Exception) -> str:
    """The driver's words: SQLAlchemy wraps them (`orig`), sqlite3 says them itself."""
    return str(getattr(exc, "orig", None) or exc)


def _is_inbox_conflict(exc: Exception) -> bool:
    text_ = _reason(exc).lower()
    return "inbox" in text_ or "pk_inbox" in text_


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class Checkpointer:
    """Checkpoints a SQLite WAL from a thread of its own, so the loop's commits never do.

    PASSIVE: it copies what no reader still needs into the database file and fsyncs it, without
    blocking writers or readers. Under a steady stream of commits that is not enough: the WAL is
    only rewound by a writer that finds every frame copied, and a new commit has always landed by
    then, so the WAL (and the WAL index every connection maps) grows for as long as the load lasts.
    So once the WAL outgrows `WAL_RESET_BYTES` the thread asks the store (`rewind`), whose writer,
    after its next commit, has `truncate` run in a worker thread while it waits: a TRUNCATE
    checkpoint copies the little the passive ones left and empties the WAL. The writer waits (the
    event loop does not) because a checkpoint that must win the writer lock from a steady stream of
    commits starves, and one run on the loop itself would stop the loop while it waits for a
    passive checkpoint or a reader.
    """

    def __init__(self, path: str, *, interval: float | None = None) -> None:
        self.path = path
        self.interval = CHECKPOINT_SECONDS if interval is None else interval
        self.checkpoints = 0
        self.rewind = threading.Event()  # the WAL outgrew its bound: the writer should empty it
        self.rewinds = 0  # TRUNCATE checkpoints that emptied the WAL
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        """Begin checkpointing every `interval` seconds."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after one last checkpoint (blocking: call it from a thread)."""
        self._stop.set()
        self._thread.join()

    def truncate(self) -> bool:
        """Empty the WAL (a TRUNCATE checkpoint on a connection of its own); False when it stayed busy.

        Blocking, up to the busy timeout: call it from a thread, with this process's writers held back.
        """
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            _sqlite_pragmas(db, None)
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            log.warning("sqlite WAL not emptied yet", error=repr(exc))
            return False
        finally:
            db.close()
        if busy:
            return False
        self.rewinds += 1
        return True

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            _sqlite_pragmas(db, None)
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    if _file_size(self.path + "-wal") > WAL_RESET_BYTES:
                        self.rewind.set()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # busy, or the file went away: the next round tries again
                    log.warning("sqlite checkpoint failed", error=repr(exc))
                if stopping:
                    return
        finally:
            db.close()


class Analyzer(Periodic):
    """ANALYZEs the store's PostgreSQL tables that changed enough since their last statistics.

    Autovacuum's measure (`ANALYZE_THRESHOLD` rows plus `ANALYZE_SCALE` of the table, counted
    in `pg_stat_user_tables`), checked every `ANALYZE_SECONDS` instead of once a naptime: a
    young table doubles in minutes, and its plans with it. An ANALYZE samples at most 30,000
    rows, so it stays cheap, and invalidates the cached plans of the prepared statements that read it.
    """

    name = "pg-analyze"

    def __init__(self, pool: Callable[[], Awaitable[asyncpg.Pool]], tables: Sequence[str], *, interval: float) -> None:
        super().__init__(interval)
        self._pool = pool
        self.tables = list(tables)
        self.analyzed: collections.Counter[str] = collections.Counter()  # ANALYZEs by table

    async def tick(self) -> None:
        pool = await self._pool()
        async with pool.acquire() as db:
            rows = await db.fetch(
                "SELECT relid::regclass::text, n_mod_since_analyze, n_live_tup FROM pg_stat_user_tables"
                " WHERE relid = ANY(SELECT to_regclass(t) FROM unnest($1::text[]) AS t)",
                self.tables,
            )
            for table, changed, live in rows:
                if changed > ANALYZE_THRESHOLD + ANALYZE_SCALE * max(live - changed, 0):
                    await db.execute(f"ANALYZE {table}")  # a regclass's text: quoted as needed
                    self.analyzed[table] += 1
                    log.debug("analyzed", table=table, changed=changed, rows=live)


async def _keep_session(_: asyncpg.Connection) -> None:
    """The hot path sets no session state: nothing to reset when a connection goes back to the pool."""


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
