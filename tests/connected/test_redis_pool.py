"""The worker's own Redis client under load: calls beyond its pool wait for a connection, none fails.

A soak found it: with a backlog, hundreds of entries finishing at once each acknowledged with its own
XACK ran redis-py's default pool (100 connections, then `MaxConnectionsError`) dry, and the entries
were left to the reclaimer while the worker fell further behind.
"""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from tests.conftest import require


async def test_many_concurrent_calls_wait_for_a_connection_instead_of_failing() -> None:
    """Ten times the pool's size in concurrent calls: all answered, never more connections than allowed."""
    require("redis")
    from streams import app as module

    client = module.redis_client
    size = module.settings.redis_max_connections
    key = f"pool-test-{uuid.uuid4().hex}"
    try:
        # BLPOP holds its connection for the timeout: many at once need more connections than the pool has.
        blocking = [client.blpop([key], timeout=0.2) for _ in range(2 * size)]
        counting = [client.incr(key + ":n") for _ in range(8 * size)]
        popped, counted = await asyncio.gather(asyncio.gather(*blocking), asyncio.gather(*counting))
        assert popped == [None] * (2 * size)
        assert sorted(int(n) for n in counted) == list(range(1, 8 * size + 1))
        pool = client.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == size
    finally:
        await client.delete(key + ":n")
        await client.connection_pool.disconnect()  # its connections belong to this test's event loop
