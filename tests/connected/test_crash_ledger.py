"""The crash ledger against the real Redis: a run that returns leaves nothing; a crashed run is counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from streams.envelope import Envelope
from streams.suspects import TTL_SECONDS, CrashLedger, ledger_key
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
        assert ledger._starts.batches < 20, "the starts shared round trips"
    finally:
        await ledger.stop()


async def test_counts_survive_redis_forgetting_its_scripts_and_dropping_the_connection(
    client: aioredis.Redis,
) -> None:
    """The ledger's own connections: a script Redis no longer knows (it restarted) is loaded again,
    and a connection Redis dropped is made anew; what failed on it says so, the next count works."""
    ledger = CrashLedger(client)
    ledger.start()
    try:
        first, second, third = envelope(), envelope(), envelope()
        await ledger.handler_started(first)
        await client.script_flush()
        await ledger.handler_started(second)
        assert await ledger.crashes(second) == 1, "counted after the script was loaded again"
        await ledger.handler_returned(first)
        assert await client.exists(ledger_key(first)) == 0
        for calls in (ledger._start_calls, ledger._end_calls):  # Redis drops the ledger's connections
            host, port = calls._connection._connection._writer.get_extra_info("sockname")[:2]  # type: ignore[union-attr]
            await client.client_kill_filter(_id=None, addr=f"{host}:{port}")
        await ledger.handler_started(third)  # on the dropped connection: logged, not counted
        await ledger.handler_started(third)
        assert await ledger.crashes(third) == 1, "the next count went out on a new connection"
        await ledger.handler_returned(second)  # on the dropped connection: retried in the background

        async def second_uncounted() -> None:
            while await client.exists(ledger_key(second)):  # noqa: ASYNC110 - the key lives in Redis
                await asyncio.sleep(0.05)

        await asyncio.wait_for(second_uncounted(), 10)
    finally:
        await ledger.stop()
        await client.delete(ledger_key(third))


async def test_counts_made_before_start_go_out_one_at_a_time_on_the_ledgers_connection(
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


async def test_a_turn_counts_down_the_runs_that_ended_and_up_the_next_in_one_call(client: aioredis.Redis) -> None:
    ledger = CrashLedger(client)
    first, second = [envelope() for _ in range(3)], [envelope() for _ in range(2)]
    crashed = envelope()
    try:
        await ledger.handler_started(crashed)  # an earlier run died: its count stays through a turn
        await ledger.turn([], [ledger_key(e) for e in [*first, crashed]])
        assert [await ledger.crashes(e) for e in first] == [1, 1, 1], "counted while they run"
        assert await ledger.crashes(crashed) == 2
        await ledger.turn([ledger_key(e) for e in [*first, crashed]], [ledger_key(e) for e in second])
        assert await client.exists(*(ledger_key(e) for e in first)) == 0, "ended: no key left"
        assert await ledger.crashes(crashed) == 1, "the earlier crash is still there"
        assert [await ledger.crashes(e) for e in second] == [1, 1]
        assert 0 < await client.ttl(ledger_key(second[0])) <= TTL_SECONDS
        await ledger.turn([ledger_key(e) for e in second], [])
        assert await client.exists(*(ledger_key(e) for e in second)) == 0
    finally:
        await client.delete(ledger_key(crashed))
        await ledger.stop()
