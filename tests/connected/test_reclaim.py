"""A reclaiming Redis subscriber (XAUTOCLAIM) as the worker declares it, on the local Redis: it claims
what another consumer left pending for `min_idle_time`, handles each entry once and acknowledges it."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from faststream.redis import RedisBroker, StreamSub

from tests.connected.conftest import REDIS_URL

GROUP = "reclaim-test"


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met within the deadline"
        await asyncio.sleep(0.05)


async def test_idle_entries_of_a_consumer_that_is_gone_are_claimed_and_handled(redis_client: aioredis.Redis) -> None:
    stream = f"reclaim-{uuid.uuid4().hex[:8]}"
    await redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(20):
        await redis_client.xadd(stream, {"n": str(i)})
    await redis_client.xreadgroup(GROUP, "gone", {stream: ">"}, count=20)  # read, never acknowledged
    seen: list[str] = []
    broker = RedisBroker(REDIS_URL)

    @broker.subscriber(
        stream=StreamSub(stream, group=GROUP, consumer="reclaimer", min_idle_time=200, polling_interval=50)
    )
    async def handle(body: dict[str, str]) -> None:  # a plain entry: its fields
        seen.append(body["n"])

    await broker.start()
    try:

        async def all_seen() -> bool:
            return len(seen) == 20

        async def nothing_pending() -> bool:
            return int((await redis_client.xpending(stream, GROUP))["pending"]) == 0

        await _until(all_seen)
        assert sorted(seen, key=int) == [str(i) for i in range(20)]  # each once
        await _until(nothing_pending)  # acknowledged after the handler
    finally:
        await broker.stop()
        await redis_client.delete(stream)
