"""The review store: open it without creating anything, read, mark and delete dead letters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from streams.core.settings import mask_url
from streams.deadletters.model import DeadLetter, PurgeGroup, PurgePlan, Selection, StoreError, reason
from streams.eventstore.store import EventStore
from streams.eventstore.tables import dead_letters


def missing_sqlite_file(url: str) -> Path | None:
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
    if (missing := missing_sqlite_file(url)) is not None:
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
