"""PostgreSQL only: the hot path's own asyncpg pool survives the server dropping its connections."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from streams.store import EventStore, Outcome
from tests.store import sent
from tests.store.conftest import PG_ADMIN_DSN

pytestmark = pytest.mark.connected


@pytest.fixture
async def pg_store(pg_database: str) -> AsyncIterator[EventStore]:
    store = EventStore(pg_database, owner="worker-a")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def _terminate_hot_connections(database: str) -> int:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return len(rows)
    finally:
        await admin.close()


async def test_commits_go_on_after_the_server_drops_every_connection(pg_store: EventStore) -> None:
    """As after a PostgreSQL restart: the next commits open fresh connections instead of failing."""
    assert (await pg_store.commit(sent(consumer="email"))).outcome is Outcome.COMMITTED
    database = pg_store.url.rsplit("/", 1)[1]
    assert await _terminate_hot_connections(database) >= 1
    for _ in range(5):
        assert (await pg_store.commit(sent(consumer="email"))).outcome is Outcome.COMMITTED
    assert await pg_store.seen("email", "never-seen") is False
