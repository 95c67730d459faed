"""The crash ledger against the real Redis: a run that returns leaves nothing; a crashed run is counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from streams.core.envelope import Envelope
from streams.policy.suspects import TTL_SECONDS, CrashLedger, ledger_key
from tests.connected.conftest import REDIS_URL


@pytest.fixture
async def client(services: None) -> AsyncIterator[aioredis.Redis]:
    c: aioredis.Redis = aioredis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def envelope(redeliveries: int = 0) -> Envelope:
    mid = str(uuid.uuid4())
    return Envelope(
        transport="redis", source="email", message_id=mid, correlation_id=mid, body=b"{}", redeliveries=redeliveries
    )


async def test_a_run_that_returns_leaves_no_key(client: aioredis.Redis) -> None:
    ledger = CrashLedger(client)
    env = envelope()
    await ledger.handler_started(env)
    assert await ledger.crashes(env) == 1, "counted while the handler runs"
    await ledger.handler_returned(env)
    assert await client.exists(ledger_key(env)) == 0
    assert await ledger.crashes(env) == 0


async def test_runs_that_never_returned_add_up_and_expire(client: aioredis.Redis) -> None:
    ledger = CrashLedger(client)
    env = envelope()
    await ledger.handler_started(env)  # the worker died here
    await ledger.handler_started(env.with_redeliveries(1))  # and here again
    assert await ledger.crashes(env.with_redeliveries(2)) == 2
    assert 0 < await client.ttl(ledger_key(env)) <= TTL_SECONDS
    await ledger.handler_started(env)
    await ledger.handler_returned(env)  # a run that returned does not erase the earlier crashes
    assert await ledger.crashes(env) == 2
    await client.delete(ledger_key(env))


async def test_concurrent_runs_share_round_trips_when_started(client: aioredis.Redis) -> None:
    ledger = CrashLedger(client)
    ledger.start()
    try:
        envs = [envelope() for _ in range(20)]
        await asyncio.gather(*(ledger.handler_started(e) for e in envs))
        assert [await ledger.crashes(e) for e in envs] == [1] * 20
        await asyncio.gather(*(ledger.handler_returned(e) for e in envs))
        assert await client.exists(*(ledger_key(e) for e in envs)) == 0
    finally:
        await ledger.stop()


async def test_counts_survive_redis_forgetting_its_scripts(
    client: aioredis.Redis,
) -> None:
    """A script Redis no longer knows (it restarted: it keeps no scripts) is loaded again."""
    ledger = CrashLedger(client)
    ledger.start()
    try:
        first, second = envelope(), envelope()
        await ledger.handler_started(first)
        await client.script_flush()
        await ledger.handler_started(second)
        assert await ledger.crashes(second) == 1, "counted after the script was loaded again"
        await ledger.handler_returned(first)
        assert await client.exists(ledger_key(first)) == 0
        await ledger.handler_returned(second)

        async def second_uncounted() -> None:
            while await client.exists(ledger_key(second)):  # noqa: ASYNC110 - the key lives in Redis
                await asyncio.sleep(0.05)

        await asyncio.wait_for(second_uncounted(), 10)
    finally:
        await ledger.stop()


async def test_counts_made_before_start_go_out_one_at_a_time_through_its_script(
    client: aioredis.Redis,
) -> None:
    """Not started, every count is its own call; side by side they still share the connection safely."""
    ledger = CrashLedger(client)
    envs = [envelope() for _ in range(20)]
    await asyncio.gather(*(ledger.handler_started(e) for e in envs))
    assert [await ledger.crashes(e) for e in envs] == [1] * 20
    await asyncio.gather(*(ledger.handler_returned(e) for e in envs))
    assert await client.exists(*(ledger_key(e) for e in envs)) == 0
    await ledger.stop()
