"""Schema migrations on a real PostgreSQL: a throwaway database per test, upgraded to exactly the tables module."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, insert, inspect, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from streams.eventstore import schema
from streams.eventstore.schema import HEAD, SchemaOutdatedError
from streams.eventstore.tables import events, metadata
from tests.conftest import require

pytestmark = pytest.mark.connected

PG_SERVER = "postgres@127.0.0.1:5432"
ADMIN_URL = f"postgresql+asyncpg://{PG_SERVER}/{os.environ.get('PIPELINE_TEST_PG_DATABASE', 'test')}"


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty database `pipeline_test_<random>`, dropped afterwards."""
    require("postgresql")
    name = f"pipeline_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield f"postgresql+asyncpg://{PG_SERVER}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()


async def on_db(url: str, work: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await engine.dispose()


def differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"include_name": schema.include_name, "compare_type": True})
    return list(compare_metadata(context, metadata))


def table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_upgrade_creates_exactly_what_tables_defines(pg_url: str) -> None:
    with pytest.raises(SchemaOutdatedError, match="pipeline db upgrade"):
        await schema.check(pg_url)

    assert await schema.migrate(pg_url) == (None, HEAD)

    assert await on_db(pg_url, table_names) == set(metadata.tables) | {"alembic_version"}
    assert await on_db(pg_url, differences) == []
    await schema.check(pg_url)
    assert await schema.current_revision(pg_url) == HEAD
    assert await schema.migrate(pg_url) == (HEAD, HEAD)


async def test_types_comments_and_sequences(pg_url: str) -> None:
    await schema.upgrade(pg_url)

    def inspect_events(conn: Connection) -> tuple[dict[str, Any], list[int]]:
        columns = {c["name"]: c for c in inspect(conn).get_columns("events")}
        row = {"stream_id": "s", "type": "t", "data": {}, "metadata": {}, "recorded_at": datetime.now(UTC)}
        for version in (1, 2):
            conn.execute(insert(events).values(**row, version=version, event_id=f"e{version}"))
        return columns, list(conn.scalars(select(events.c.position).order_by(events.c.position)))

    columns, positions = await on_db(pg_url, inspect_events)
    assert str(columns["position"]["type"]) == "BIGINT"
    assert columns["position"]["comment"] == "global order"
    assert columns["metadata"]["comment"] == "message_id, correlation_id, causation_id, attempt, source"
    assert columns["recorded_at"]["type"].timezone is True
    assert positions == [1, 2]


async def test_concurrent_upgrades_queue_up_on_the_advisory_lock(pg_url: str) -> None:
    await asyncio.gather(*(schema.upgrade(pg_url) for _ in range(4)))
    assert await schema.current_revision(pg_url) == HEAD
    assert await on_db(pg_url, differences) == []


async def test_the_released_schema_is_adopted(pg_url: str) -> None:
    """The last release before migrations made `events` (without the metadata comment) and `dead_letters`."""
    legacy = MetaData()
    for name in ("events", "dead_letters"):
        metadata.tables[name].to_metadata(legacy)
    legacy.tables["events"].c["metadata"].comment = None
    await on_db(pg_url, legacy.create_all)

    await schema.upgrade(pg_url)

    assert await on_db(pg_url, differences) == []
    await schema.check(pg_url)


async def test_tables_that_do_not_match_are_not_adopted_and_nothing_changes(pg_url: str) -> None:
    odd = MetaData()
    Table("events", odd, Column("position", Integer, primary_key=True), Column("stream_id", String(10)))
    await on_db(pg_url, odd.create_all)

    with pytest.raises(SchemaOutdatedError, match="created before migrations"):
        await schema.upgrade(pg_url)

    assert await on_db(pg_url, table_names) == {"events"}
    assert await schema.current_revision(pg_url) is None


async def test_other_tables_in_a_shared_database_are_left_alone(pg_url: str) -> None:
    await on_db(pg_url, lambda c: c.execute(text("CREATE TABLE someone_elses (id int primary key)")))
    await schema.upgrade(pg_url)
    assert await on_db(pg_url, differences) == []
    assert "someone_elses" in await on_db(pg_url, table_names)
