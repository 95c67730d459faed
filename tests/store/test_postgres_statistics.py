"""PostgreSQL only: the store analyzes its young tables itself, so the hot lookups use their indexes.

Without statistics (a new database, before autovacuum's first round a minute later) PostgreSQL
plans the inbox lookup as a read of every row of its consumer: a commit grew slower with every
message the store held.
"""

from __future__ import annotations

import asyncio

import pytest

from streams.eventstore import store as store_module
from streams.eventstore.store import EventStore, Outcome
from tests.store import sent

pytestmark = pytest.mark.connected

INBOX_LOOKUP = (
    "SELECT consumer, message_id FROM inbox WHERE consumer = ANY($1::text[]) AND message_id = ANY($2::text[])"
)


@pytest.fixture(autouse=True)
def analyze_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """The analyzer checks every 50 ms here (before `pg_store` starts it)."""
    monkeypatch.setattr(store_module, "ANALYZE_SECONDS", 0.05)


async def _until_analyzed(store: EventStore, table: str, timeout: float = 30.0) -> None:
    """Wait until the analyzer analyzed `table` (PostgreSQL reports a backend's changes within seconds)."""
    assert store.analyzer is not None
    deadline = asyncio.get_running_loop().time() + timeout
    while table not in store.analyzer.analyzed:
        assert asyncio.get_running_loop().time() < deadline, f"{table} not analyzed within {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_growing_inbox_is_analyzed_and_looked_up_by_its_key(pg_store: EventStore) -> None:
    units = [sent(consumer="email") for _ in range(2_000)]
    results = await pg_store.commit_many(units)
    assert all(not isinstance(r, BaseException) and r.outcome is Outcome.COMMITTED for r in results)

    for table in ("inbox", "events", "outbox", "email_log"):
        await _until_analyzed(pg_store, table)

    pool = await pg_store._pg()
    async with pool.acquire() as db:
        # PostgreSQL may report the changes in parts: wait for statistics that count every row.
        deadline = asyncio.get_running_loop().time() + 30
        while await db.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'inbox'::regclass") < len(units):
            assert asyncio.get_running_loop().time() < deadline, "no statistics of the whole inbox within 30 s"
            await asyncio.sleep(0.05)
        # The plan every later lookup gets once the prepared statement's plan is cached.
        await db.execute("SET plan_cache_mode = force_generic_plan")
        try:
            lookup = await db.prepare("EXPLAIN " + INBOX_LOOKUP)
            plan = "\n".join(r[0] for r in await lookup.fetch(["email"], [u.env.message_id for u in units[:4]]))
        finally:
            await db.execute("RESET plan_cache_mode")
    assert "Seq Scan" not in plan
    assert "Index Cond" in plan, plan
    assert "message_id" in plan.split("Index Cond", 1)[1], plan  # both key columns, not the consumer alone
    # The lookup itself: what was committed is seen, the rest is not.
    assert await pg_store.seen_many("email", [units[0].env.message_id, "never-seen"]) == [True, False]


async def test_tables_that_did_not_change_are_not_analyzed_again(pg_store: EventStore) -> None:
    await pg_store.commit_many([sent(consumer="email") for _ in range(500)])
    await _until_analyzed(pg_store, "inbox")
    analyzer = pg_store.analyzer
    assert analyzer is not None
    await analyzer.stop()  # ticks by hand from here on
    await analyzer.tick()  # catches up with whatever PostgreSQL reported since
    before = analyzer.analyzed.copy()
    await analyzer.tick()
    await analyzer.tick()
    assert analyzer.analyzed == before
