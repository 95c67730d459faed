"""A reclaiming Redis subscriber (XAUTOCLAIM) as the worker runs it, on the local Redis.

It claims what another consumer left pending for `min_idle_time`, and only that: entries in
flight on a live consumer (a lane's hundreds) cost it one XPENDING a polling interval, not a
sweep of XAUTOCLAIM calls ten entries at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from faststream.redis import RedisBroker, StreamSub

from streams.groups import keep_group_alive
from tests.connected.conftest import REDIS_URL

GROUP = "reclaim-test"


class _Counted:
    """Counts the calls of some of a client's commands (the others pass through)."""

    def __init__(self, client: aioredis.Redis, *commands: str) -> None:
        self.calls = dict.fromkeys(commands, 0)
        for command in commands:
            setattr(client, command, self._counting(command, getattr(client, command)))

    def _counting(self, command: str, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[command] += 1
            return await call(*args, **kwargs)

        return counted


async def _pending_on_a_consumer(client: aioredis.Redis, stream: str, count: int) -> None:
    """`count` entries read by consumer `gone` and never acknowledged."""
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(count):
        await client.xadd(stream, {"n": str(i)})
    await client.xreadgroup(GROUP, "gone", {stream: ">"}, count=count)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met within the deadline"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def reclaimer(
    client: aioredis.Redis, pending: int, min_idle_ms: int
) -> AsyncIterator[tuple[str, list[str], _Counted]]:
    """A stream with `pending` entries left on consumer `gone`, and a reclaiming subscriber on it
    (as the worker runs it); yields the stream, what the handler saw, and the counted commands."""
    stream = f"reclaim-{uuid.uuid4().hex[:8]}"
    await _pending_on_a_consumer(client, stream, pending)
    seen: list[str] = []
    broker = RedisBroker(REDIS_URL)
    sub = broker.subscriber(
        stream=StreamSub(stream, group=GROUP, consumer="reclaimer", min_idle_time=min_idle_ms, polling_interval=50)
    )

    @sub
    async def handle(body: dict[str, str]) -> None:  # a plain entry: its fields
        seen.append(body["n"])

    keep_group_alive(sub)
    await broker.connect()
    counted = _Counted(sub._client, "xautoclaim", "xpending_range")
    await broker.start()
    try:
        yield stream, seen, counted
    finally:
        await broker.stop()
        await client.delete(stream)


async def test_entries_in_flight_elsewhere_are_not_swept(redis_client: aioredis.Redis) -> None:
    async with reclaimer(redis_client, 300, 60_000) as (stream, seen, counted):
        # Ten polls of XPENDING (half a second): FastStream's own read swept the 300 entries,
        # ten a call, about 30 XAUTOCLAIM calls each polling interval.
        await _until(lambda: counted.calls["xpending_range"] >= 10 or counted.calls["xautoclaim"] >= 10)
        assert counted.calls["xautoclaim"] == 0, "swept entries that were not idle"
        assert seen == []
        summary = await redis_client.xpending(stream, GROUP)
        assert summary["pending"] == 300
        assert {c["name"] for c in summary["consumers"]} == {b"gone"}  # nothing was claimed


async def test_idle_entries_of_a_consumer_that_is_gone_are_claimed_and_handled(redis_client: aioredis.Redis) -> None:
    async with reclaimer(redis_client, 20, 200) as (stream, seen, counted):
        await _until(lambda: len(seen) == 20)
        assert sorted(seen, key=int) == [str(i) for i in range(20)]  # each once
        # One claim a call, each from an entry XPENDING showed idle.
        assert counted.calls["xautoclaim"] >= 20

        async def nothing_pending() -> bool:
            return int((await redis_client.xpending(stream, GROUP))["pending"]) == 0

        deadline = asyncio.get_running_loop().time() + 10
        while not await nothing_pending():  # acknowledged after the handler
            assert asyncio.get_running_loop().time() < deadline, "claimed entries not acknowledged"
            await asyncio.sleep(0.05)
