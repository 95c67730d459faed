"""The `store` fixture: a fresh, started EventStore per test, on SQLite and on PostgreSQL.

SQLite gets a temporary file per test. PostgreSQL gets one fresh database per test module
(`pipeline_contract_<random>`, dropped at the end) and every table truncated before each
test. The PostgreSQL half is marked `connected`: it skips when nothing answers on :5432 and
fails when `CI=true`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from streams.eventstore.store import EventStore
from streams.eventstore.tables import metadata
from tests.conftest import require

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.connected),
]


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test module, dropped afterwards; yields its URL."""
    require("postgresql")
    name = f"pipeline_contract_{uuid.uuid4().hex[:12]}"
    # Sync fixture, own loop: it is set up outside any test's event loop.
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_URL.format(name=name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def pg_store(pg_database: str) -> AsyncIterator[EventStore]:
    """A started PostgreSQL store on this module's database (tables as earlier tests left them)."""
    store = EventStore(pg_database, owner="worker-a")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of this test's backend."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_database")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[EventStore]:
    """A started store with empty tables, closed after the test."""
    store = EventStore(store_url, owner="worker-a")
    await store.start()
    if store.engine.dialect.name == "postgresql":
        tables = ", ".join(t.name for t in metadata.sorted_tables)
        async with store.engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
    try:
        yield store
    finally:
        await store.close()
