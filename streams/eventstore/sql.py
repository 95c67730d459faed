"""The statements of the store's hot path, on three drivers: SQLAlchemy Core, sqlite3, asyncpg.

`EventStore` and `projections` ask for what they need by name (`inbox_has`, `insert`,
`positions`...), never for SQL. `CoreStatements` runs them through SQLAlchemy (any engine handed
to a rebuild, any other driver). `SqliteStatements` runs them on a plain `sqlite3` connection,
inline on the event loop, and `AsyncpgStatements` on the asyncpg connection of SQLAlchemy's pool.
SQLAlchemy's per-statement work (execution context, parameter processing, expanding IN, result
rows) outweighs the statement itself, and every message runs several statements, so the hot path
skips that layer where it can. On SQLite, values still go through SQLAlchemy's own bind processors
for the column types (looked up once per table), so every driver stores the same values.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import JSON, DateTime, Delete, Select, Table, bindparam, func, insert, select, update
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from streams.eventstore.tables import events, inbox, outbox

Row = dict[str, Any]


class Statements(Protocol):
    """What the hot path asks of one connection (in a transaction when it writes)."""

    async def inbox_has(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (consumer, message id) keys the inbox holds."""
        ...

    async def versions(self, stream_ids: Collection[str]) -> dict[str, int]:
        """The last version of each of these streams that has events."""
        ...

    async def positions(self, event_ids: Sequence[str]) -> dict[str, int]:
        """The log position of each of these events."""
        ...

    async def insert(self, table: Table, rows: Sequence[Row]) -> None:
        """Insert rows (all with the same keys)."""
        ...

    async def insert_returning_id(self, table: Table, row: Row) -> int:
        """Insert one row; its generated `id`."""
        ...

    async def by_key(self, table: Table, keys: Collection[str], columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """These columns of the rows whose (single-column) primary key is one of `keys`."""
        ...

    async def delete_by_key(self, table: Table, keys: Collection[str]) -> None:
        """Delete the rows whose (single-column) primary key is one of `keys`."""
        ...

    async def mark_published(self, event_ids: Sequence[str], now: datetime) -> None:
        """Stamp the outbox rows of these events as published."""
        ...

    async def claim_orphans(self, owner: str, older_than: datetime, now: datetime) -> int:
        """Give `owner` the other owners' unpublished rows created before `older_than`; how many."""
        ...

    async def unpublished(self, owner: str, limit: int, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """`owner`'s unpublished outbox rows, oldest first."""
        ...


# --- SQLAlchemy Core ------------------------------------------------------------------------------


class CoreStatements:
    """The statements through SQLAlchemy Core, on an `AsyncConnection` (any dialect)."""

    __slots__ = ("conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def inbox_has(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (consumer, message id) keys the inbox holds."""
        if not keys:
            return set()
        consumers, message_ids = _key_columns(keys)
        rows = await self.conn.execute(_IN_INBOX, {"consumers": consumers, "message_ids": message_ids})
        return {(r[0], r[1]) for r in rows}

    async def versions(self, stream_ids: Collection[str]) -> dict[str, int]:
        """The last version of each of these streams that has events."""
        rows = await self.conn.execute(_VERSIONS, {"stream_ids": list(stream_ids)})
        return {r[0]: int(r[1]) for r in rows}

    async def positions(self, event_ids: Sequence[str]) -> dict[str, int]:
        """The log position of each of these events."""
        rows = await self.conn.execute(_POSITIONS, {"event_ids": list(event_ids)})
        return {r[0]: int(r[1]) for r in rows}

    async def insert(self, table: Table, rows: Sequence[Row]) -> None:
        """Insert rows (all with the same keys)."""
        if rows:
            await self.conn.execute(insert(table), list(rows))

    async def insert_returning_id(self, table: Table, row: Row) -> int:
        """Insert one row; its generated `id`."""
        return int(await self.conn.scalar(insert(table).values(row).returning(table.c.id)))

    async def by_key(self, table: Table, keys: Collection[str], columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """These columns of the rows whose (single-column) primary key is one of `keys`."""
        rows = await self.conn.execute(_select_by_key(table, tuple(columns)), {"keys": list(keys)})
        return [tuple(r) for r in rows]

    async def delete_by_key(self, table: Table, keys: Collection[str]) -> None:
        """Delete the rows whose (single-column) primary key is one of `keys`."""
        if keys:
            await self.conn.execute(_delete_by_key(table), {"keys": list(keys)})

    async def mark_published(self, event_ids: Sequence[str], now: datetime) -> None:
        """Stamp the outbox rows of these events as published."""
        await self.conn.execute(_MARK_PUBLISHED, {"event_ids": list(event_ids), "now": now})

    async def claim_orphans(self, owner: str, older_than: datetime, now: datetime) -> int:
        """Give `owner` the other owners' unpublished rows created before `older_than`; how many."""
        result = await self.conn.execute(
            update(outbox)
            .where(outbox.c.published_at.is_(None), outbox.c.owner != owner, outbox.c.created_at < older_than)
            .values(owner=owner, created_at=now)
        )
        return int(result.rowcount or 0)

    async def unpublished(self, owner: str, limit: int, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """`owner`'s unpublished outbox rows, oldest first."""
        query = (
            select(*(outbox.c[name] for name in columns))
            .where(outbox.c.published_at.is_(None), outbox.c.owner == owner)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        return [tuple(r) for r in await self.conn.execute(query)]


# Built once, with expanding parameters: an `in_(values)` built per call coerces every value into
# its own bound parameter, again for every message.
_IN_INBOX = select(inbox.c.consumer, inbox.c.message_id).where(
    # Both key columns, so the (consumer, message_id) primary key is used, not a table scan.
    inbox.c.consumer.in_(bindparam("consumers", expanding=True)),
    inbox.c.message_id.in_(bindparam("message_ids", expanding=True)),
)
_VERSIONS = (
    select(events.c.stream_id, func.max(events.c.version))
    .where(events.c.stream_id.in_(bindparam("stream_ids", expanding=True)))
    .group_by(events.c.stream_id)
)
_POSITIONS = select(events.c.event_id, events.c.position).where(
    events.c.event_id.in_(bindparam("event_ids", expanding=True))
)
_MARK_PUBLISHED = (
    update(outbox)
    .where(outbox.c.event_id.in_(bindparam("event_ids", expanding=True)))
    .values(published_at=bindparam("now"))
)


@functools.cache
def _select_by_key(table: Table, columns: tuple[str, ...]) -> Select[Any]:
    return select(*(table.c[name] for name in columns)).where(_key(table).in_(bindparam("keys", expanding=True)))


@functools.cache
def _delete_by_key(table: Table) -> Delete:
    return table.delete().where(_key(table).in_(bindparam("keys", expanding=True)))


# --- sqlite3 (identifiers in the SQL text come from streams.eventstore.tables; values are bound) ---------------


class SqliteStatements:
    """The statements on a plain `sqlite3` connection: they run at once, on the calling thread."""

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def inbox_has(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (consumer, message id) keys the inbox holds."""
        if not keys:
            return set()
        consumers, message_ids = _key_columns(keys)
        sql = _in(
            "SELECT consumer, message_id FROM inbox WHERE consumer IN ({}) AND message_id IN ({})",
            len(consumers),
            len(message_ids),
        )
        return {(r[0], r[1]) for r in self.db.execute(sql, (*consumers, *message_ids))}

    async def versions(self, stream_ids: Collection[str]) -> dict[str, int]:
        """The last version of each of these streams that has events."""
        ids = tuple(stream_ids)
        sql = _in("SELECT stream_id, max(version) FROM events WHERE stream_id IN ({}) GROUP BY stream_id", len(ids))
        return {r[0]: int(r[1]) for r in self.db.execute(sql, ids)}

    async def positions(self, event_ids: Sequence[str]) -> dict[str, int]:
        """The log position of each of these events."""
        sql = _in("SELECT event_id, position FROM events WHERE event_id IN ({})", len(event_ids))
        return {r[0]: int(r[1]) for r in self.db.execute(sql, tuple(event_ids))}

    async def insert(self, table: Table, rows: Sequence[Row]) -> None:
        """Insert rows (all with the same keys)."""
        if rows:
            sql, plan = _insert_plan(table, tuple(rows[0]))
            self.db.executemany(sql, plan.values(rows))

    async def insert_returning_id(self, table: Table, row: Row) -> int:
        """Insert one row; its generated `id`."""
        sql, plan = _insert_plan(table, tuple(row))
        rowid = self.db.execute(sql, plan.values([row])[0]).lastrowid
        assert rowid is not None
        return rowid

    async def by_key(self, table: Table, keys: Collection[str], columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """These columns of the rows whose (single-column) primary key is one of `keys`."""
        ids = tuple(keys)
        sql = _in(f"SELECT {_names(table, columns)} FROM {table.name} WHERE {_key(table).name} IN ({{}})", len(ids))  # noqa: S608
        return self.db.execute(sql, ids).fetchall()

    async def delete_by_key(self, table: Table, keys: Collection[str]) -> None:
        """Delete the rows whose (single-column) primary key is one of `keys`."""
        ids = tuple(keys)
        if ids:
            sql = _in(f"DELETE FROM {table.name} WHERE {_key(table).name} IN ({{}})", len(ids))  # noqa: S608
            self.db.execute(sql, ids)

    async def mark_published(self, event_ids: Sequence[str], now: datetime) -> None:
        """Stamp the outbox rows of these events as published."""
        sql = _in("UPDATE outbox SET published_at = ? WHERE event_id IN ({})", len(event_ids))
        self.db.execute(sql, (_DATETIME(now), *event_ids))

    async def claim_orphans(self, owner: str, older_than: datetime, now: datetime) -> int:
        """Give `owner` the other owners' unpublished rows created before `older_than`; how many."""
        cursor = self.db.execute(
            "UPDATE outbox SET owner = ?, created_at = ? WHERE published_at IS NULL AND owner != ? AND created_at < ?",
            (owner, _DATETIME(now), owner, _DATETIME(older_than)),
        )
        return cursor.rowcount

    async def unpublished(self, owner: str, limit: int, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """`owner`'s unpublished outbox rows, oldest first."""
        sql = (
            f"SELECT {_names(outbox, columns)} FROM outbox WHERE published_at IS NULL AND owner = ? ORDER BY id LIMIT ?"  # noqa: S608
        )
        return self.db.execute(sql, (owner, limit)).fetchall()


# --- asyncpg (the same SQL text rules as sqlite3) --------------------------------------------------


class AsyncpgStatements:
    """The statements on the asyncpg connection under SQLAlchemy's pooled one: SQLAlchemy's own
    per-statement work weighs as much here as on SQLite, and PostgreSQL's IN lists become one
    array parameter (`= ANY($1)`), so a statement's text does not depend on how many keys it has."""

    __slots__ = ("db",)

    def __init__(self, db: Any) -> None:  # an asyncpg.Connection
        self.db = db

    async def inbox_has(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (consumer, message id) keys the inbox holds."""
        if not keys:
            return set()
        consumers, message_ids = _key_columns(keys)
        rows = await self.db.fetch(
            "SELECT consumer, message_id FROM inbox WHERE consumer = ANY($1::text[]) AND message_id = ANY($2::text[])",
            consumers,
            message_ids,
        )
        return {(r[0], r[1]) for r in rows}

    async def versions(self, stream_ids: Collection[str]) -> dict[str, int]:
        """The last version of each of these streams that has events."""
        rows = await self.db.fetch(
            "SELECT stream_id, max(version) FROM events WHERE stream_id = ANY($1::text[]) GROUP BY stream_id",
            list(stream_ids),
        )
        return {r[0]: int(r[1]) for r in rows}

    async def positions(self, event_ids: Sequence[str]) -> dict[str, int]:
        """The log position of each of these events."""
        rows = await self.db.fetch(
            "SELECT event_id, position FROM events WHERE event_id = ANY($1::text[])", list(event_ids)
        )
        return {r[0]: int(r[1]) for r in rows}

    async def insert(self, table: Table, rows: Sequence[Row]) -> None:
        """Insert rows (all with the same keys)."""
        if rows:
            sql, plan = _pg_insert_plan(table, tuple(rows[0]))
            await self.db.executemany(sql, plan.values(rows))

    async def insert_returning_id(self, table: Table, row: Row) -> int:
        """Insert one row; its generated `id`."""
        sql, plan = _pg_insert_plan(table, tuple(row))
        return int(await self.db.fetchval(f"{sql} RETURNING id", *plan.values([row])[0]))

    async def by_key(self, table: Table, keys: Collection[str], columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """These columns of the rows whose (single-column) primary key is one of `keys`."""
        sql = f"SELECT {_names(table, columns)} FROM {table.name} WHERE {_key(table).name} = ANY($1::text[])"  # noqa: S608
        return [tuple(r) for r in await self.db.fetch(sql, list(keys))]

    async def delete_by_key(self, table: Table, keys: Collection[str]) -> None:
        """Delete the rows whose (single-column) primary key is one of `keys`."""
        if keys:
            sql = f"DELETE FROM {table.name} WHERE {_key(table).name} = ANY($1::text[])"  # noqa: S608
            await self.db.execute(sql, list(keys))

    async def mark_published(self, event_ids: Sequence[str], now: datetime) -> None:
        """Stamp the outbox rows of these events as published."""
        await self.db.execute(
            "UPDATE outbox SET published_at = $1 WHERE event_id = ANY($2::text[])", now, list(event_ids)
        )

    async def claim_orphans(self, owner: str, older_than: datetime, now: datetime) -> int:
        """Give `owner` the other owners' unpublished rows created before `older_than`; how many."""
        status = await self.db.execute(
            "UPDATE outbox SET owner = $1, created_at = $2"
            " WHERE published_at IS NULL AND owner != $1 AND created_at < $3",
            owner,
            now,
            older_than,
        )
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE <count>"

    async def unpublished(self, owner: str, limit: int, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """`owner`'s unpublished outbox rows, oldest first."""
        where = "published_at IS NULL AND owner = $1 ORDER BY id LIMIT $2"
        sql = f"SELECT {_names(outbox, columns)} FROM outbox WHERE {where}"  # noqa: S608
        return [tuple(r) for r in await self.db.fetch(sql, owner, limit)]


def json_dumps(value: Any) -> str:
    """JSON columns written with orjson, which is faster than `json.dumps` on every row."""
    return orjson.dumps(value).decode()


# The dialect whose bind processors turn values into what SQLAlchemy would store (datetimes as
# text, JSON through orjson): the sqlite3 path and the SQLAlchemy path write the same values.
_SQLITE = SQLiteDialect_pysqlite(json_serializer=json_dumps)
Encoder = Callable[[Any], Any] | None


def _processor(table: Table, name: str) -> Encoder:
    type_ = table.c[name].type
    return type_.dialect_impl(_SQLITE).bind_processor(_SQLITE)


def _datetime_encoder() -> Callable[[datetime], str]:
    encode = _processor(outbox, "created_at")
    assert encode is not None
    return encode


_DATETIME = _datetime_encoder()


class _Values:
    """How rows of one table, all with the same keys, become statement parameters: the values in
    column order (one C call a row), each encoded where its column type says so. Rows of a batch
    share their timestamps, so a timestamp is encoded once a batch, not once a row (SQLAlchemy's
    datetime processor formats a string each call)."""

    __slots__ = ("encoders", "get", "single")

    def __init__(self, names: tuple[str, ...], encoders: Sequence[Encoder], once: Sequence[bool]) -> None:
        self.get = operator.itemgetter(*names)
        self.single = len(names) == 1  # itemgetter of one key returns the value, not a tuple
        self.encoders = tuple(
            (i, encode, memo) for i, (encode, memo) in enumerate(zip(encoders, once, strict=True)) if encode
        )

    def values(self, rows: Sequence[Row]) -> list[Sequence[Any]]:
        get = self.get
        if self.single:
            params: list[Sequence[Any]] = [(get(row),) for row in rows]
        else:
            params = [get(row) for row in rows]
        if not self.encoders:
            return params
        memos: dict[int, dict[Any, Any]] = {i: {} for i, _, once in self.encoders if once}
        out: list[Sequence[Any]] = []
        for raw in params:
            row = list(raw)
            for i, encode, once in self.encoders:
                value = row[i]
                if once:
                    memo = memos[i]
                    if value not in memo:
                        memo[value] = encode(value)
                    row[i] = memo[value]
                else:
                    row[i] = encode(value)
            out.append(row)
        return out


@functools.cache
def _insert_plan(table: Table, names: tuple[str, ...]) -> tuple[str, _Values]:
    sql = f"INSERT INTO {table.name} ({_names(table, names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608
    once = [isinstance(table.c[name].type, DateTime) for name in names]
    return sql, _Values(names, [_processor(table, name) for name in names], once)


@functools.cache
def _pg_insert_plan(table: Table, names: tuple[str, ...]) -> tuple[str, _Values]:
    # asyncpg takes Python values as they are (datetimes, bytes); JSON goes as its text.
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    sql = f"INSERT INTO {table.name} ({_names(table, names)}) VALUES ({placeholders})"  # noqa: S608
    encoders = [json_dumps if isinstance(table.c[name].type, JSON) else None for name in names]
    return sql, _Values(names, encoders, [False] * len(names))


@functools.lru_cache(maxsize=4096)
def _in(template: str, *counts: int) -> str:
    """`template` with each `{}` replaced by that many `?` placeholders."""
    return template.format(*(", ".join("?" * n) for n in counts))


def _names(table: Table, columns: Sequence[str]) -> str:
    """Column names for SQL text, each checked to be a column of `table` (identifiers never come
    from input: only from `streams.eventstore.tables`; values are always bound)."""
    return ", ".join(table.c[name].name for name in columns)


def _key(table: Table) -> Any:
    (column,) = table.primary_key.columns
    return column


def _key_columns(keys: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return sorted({c for c, _ in keys}), sorted({m for _, m in keys})
