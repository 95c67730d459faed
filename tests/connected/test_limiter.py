"""The shared limiter against the real Redis: two limiters stand for two workers sharing one provider.

Each test uses a dependency name of its own, so tests never share a schedule.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from streams.core.settings import DependencyLimits
from streams.policy.limits import ANSWER_WEIGHT, DEFAULT_ANSWER_TOKENS, KEY_PREFIX, PACE_MARGIN, Limiter, MustWait
from tests.conftest import require
from tests.connected.conftest import REDIS_URL


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    require("redis")
    redis = aioredis.from_url(REDIS_URL)
    yield redis
    await redis.aclose()


def dependency() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def two(client: aioredis.Redis, name: str, limits: DependencyLimits, max_wait: float = 5.0) -> list[Limiter]:
    return [Limiter(client, {name: limits}, max_wait=max_wait) for _ in range(2)]


def most_in_any_second(starts: list[float]) -> int:
    starts = sorted(starts)
    return max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))


async def cleanup(client: aioredis.Redis, name: str) -> None:
    await client.delete(KEY_PREFIX + name, KEY_PREFIX + name + ":leases")


async def test_two_workers_together_keep_to_the_requests_per_second(client: aioredis.Redis) -> None:
    """40 calls through two limiters at 20/s: evenly paced across both, never more than 20 in a second."""
    name = dependency()
    limiters = two(client, name, DependencyLimits(requests_per_second=20))
    starts: list[float] = []

    async def call(limiter: Limiter) -> None:
        permit = await limiter.acquire(name)
        starts.append(time.monotonic())
        await permit.release()

    try:
        began = time.monotonic()
        await asyncio.gather(*(call(limiters[i % 2]) for i in range(40)))
        # Unshared, the two would start 40 in the first second. Shared, 20 a second; one more may
        # land on a window's edge, by how late this loop wakes each sleeper (the provider-side
        # count is measured by `make bench-io`).
        assert most_in_any_second(starts) <= 21
        # 40 calls at 20/s, the first at once: the last one starts about 1.95 s in.
        assert max(starts) - began >= 1.8
    finally:
        await cleanup(client, name)


async def test_two_workers_together_keep_to_the_max_concurrency(client: aioredis.Redis) -> None:
    """Calls in flight across both limiters never exceed max_concurrency; each waits its turn, none is lost."""
    name = dependency()
    limiters = two(client, name, DependencyLimits(max_concurrency=3))
    in_flight = peak = done = 0

    async def call(limiter: Limiter) -> None:
        nonlocal in_flight, peak, done
        permit = await limiter.acquire(name)
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        done += 1
        await permit.release()

    try:
        await asyncio.gather(*(call(limiters[i % 2]) for i in range(24)))
        assert peak == 3
        assert done == 24
        assert await client.zcard(KEY_PREFIX + name + ":leases") == 0  # every slot given back
    finally:
        await cleanup(client, name)


async def test_a_call_waiting_for_its_turn_holds_no_concurrency_slot(client: aioredis.Redis) -> None:
    """At 2/s with one call in flight at most, two calls waiting for their turns (0.5 s and 1 s away)
    both hold their reservations and neither holds the slot: the slot is taken when the turn came,
    so the cap never idles while the rate is what holds calls back."""
    name = dependency()
    [limiter, other] = two(client, name, DependencyLimits(requests_per_second=2, max_concurrency=1))
    try:
        await (await limiter.acquire(name)).release()

        async def frontier() -> float:  # the end of the reserved turns (ms)
            return float(await client.hget(KEY_PREFIX + name, "req") or 0)

        first_frontier = await frontier()

        async def call(limiter: Limiter) -> None:
            await (await limiter.acquire(name)).release()

        waiting = [asyncio.create_task(call(limiter)), asyncio.create_task(call(other))]
        deadline = time.monotonic() + 2.0
        while await frontier() < first_frontier + 2 * 500 * PACE_MARGIN - 1:
            assert time.monotonic() < deadline, "both calls should have reserved their turns"
            await asyncio.sleep(0.01)
        assert not any(task.done() for task in waiting)  # still waiting for their turns
        assert await client.zcard(KEY_PREFIX + name + ":leases") == 0
        await asyncio.gather(*waiting)
    finally:
        await cleanup(client, name)


async def test_a_wait_longer_than_max_wait_is_not_reserved_but_refused(client: aioredis.Redis) -> None:
    """At 1/s with max_wait 0.3 s, the second call is told to wait on the broker, and reserves nothing;
    refused calls line up one interval apart (a backlog comes back at the limit's pace, not at once)."""
    name = dependency()
    [limiter, other] = two(client, name, DependencyLimits(requests_per_second=1), max_wait=0.3)
    try:
        await (await limiter.acquire(name)).release()
        schedule = await client.hget(KEY_PREFIX + name, "req")
        with pytest.raises(MustWait) as refused:
            await limiter.acquire(name)
        assert 0.5 < refused.value.seconds <= 1.0 * PACE_MARGIN
        assert refused.value.reason == "requests per second"
        later = await asyncio.gather(other.acquire(name), limiter.acquire(name), return_exceptions=True)
        assert all(isinstance(r, MustWait) for r in later)
        waits = sorted(r.seconds for r in later if isinstance(r, MustWait))
        interval = PACE_MARGIN
        assert waits[0] == pytest.approx(refused.value.seconds + interval, abs=0.1)
        assert waits[1] == pytest.approx(refused.value.seconds + 2 * interval, abs=0.1)
        assert await client.hget(KEY_PREFIX + name, "req") == schedule  # the refusals reserved nothing
    finally:
        await cleanup(client, name)


async def test_refused_calls_come_back_to_a_free_turn(client: aioredis.Redis) -> None:
    """A backlog at 5/s (max_wait 0.3 s): what cannot start within 0.3 s is refused, and each refused
    call retried after the wait it was told is granted on its first return (the line spreads the
    backlog at the limit's pace), so no call is refused twice."""
    name = dependency()
    workers = two(client, name, DependencyLimits(requests_per_second=5), max_wait=0.3)

    async def call(limiter: Limiter) -> None:
        await (await limiter.acquire(name)).release()  # raises MustWait when refused

    try:
        first = await asyncio.gather(*(call(workers[i % 2]) for i in range(10)), return_exceptions=True)
        refused = [(i, r.seconds) for i, r in enumerate(first) if isinstance(r, MustWait)]
        assert len(refused) >= 6
        assert all(r is None or isinstance(r, MustWait) for r in first)

        async def come_back(limiter: Limiter, wait: float) -> None:
            await asyncio.sleep(wait)
            await call(limiter)

        await asyncio.gather(*(come_back(workers[i % 2], wait) for i, wait in refused))
    finally:
        await cleanup(client, name)


async def test_tokens_are_reserved_before_and_settled_after(client: aioredis.Redis) -> None:
    """At 6,000 tokens a minute (100/s), 50 reserved tokens hold the next call back 0.5 s, unless the
    call reports it used none: then they are given back and the next call starts at once."""
    name = dependency()
    [limiter, other] = two(client, name, DependencyLimits(tokens_per_minute=6_000), max_wait=0.2)
    try:
        first = await limiter.acquire(name, tokens=50)
        await first.release(used_tokens=50)
        with pytest.raises(MustWait) as refused:
            await other.acquire(name, tokens=50)
        assert refused.value.reason == "tokens per minute"
        assert 0.3 < refused.value.seconds <= 0.5 * PACE_MARGIN
        name2 = dependency()
        [a, b] = two(client, name2, DependencyLimits(tokens_per_minute=6_000), max_wait=0.2)
        permit = await a.acquire(name2, tokens=50)
        await permit.release(used_tokens=0)  # e.g. the provider refused the call: nothing used
        started = time.monotonic()
        await (await b.acquire(name2, tokens=10)).release(used_tokens=10)
        assert time.monotonic() - started < 0.2
        await cleanup(client, name2)
    finally:
        await cleanup(client, name)


async def test_tokens_given_back_never_free_time_before_a_turn_already_granted(client: aioredis.Redis) -> None:
    """A call reserves its estimate; a second is granted the turn after it; the first then reports it
    used nothing. Its tokens go back, but the schedule stays at the second call's turn: a call placed
    in the freed time would overlap the second, and the provider's minute would see too many."""
    name = dependency()
    [limiter, other] = two(client, name, DependencyLimits(tokens_per_minute=6_000), max_wait=10.0)
    key = KEY_PREFIX + name

    async def field(name: str) -> float:
        return float(await client.hget(key, name) or 0)

    try:
        first = await limiter.acquire(name, tokens=100)  # 100 + 256 (no answer seen yet): 3.6 s
        second = asyncio.create_task(other.acquire(name, tokens=10))
        deadline = time.monotonic() + 2.0
        while await field("last") < await field("tok") - 3_000:  # the second's turn, 3.6 s on
            assert time.monotonic() < deadline, "the second call should have reserved its turn"
            await asyncio.sleep(0.01)
        granted = await field("last")
        await first.release(used_tokens=0)
        assert await field("tok") == pytest.approx(granted, abs=1.0)  # not before the second's turn
        second.cancel()
    finally:
        await cleanup(client, name)


async def test_a_pushback_seen_by_one_worker_holds_back_the_other(client: aioredis.Redis) -> None:
    """Retry-After told to one limiter reaches the other through Redis: it is throttled, calls wait on the broker."""
    name = dependency()
    teller, other = (Limiter(client, {}, max_wait=0.5) for _ in range(2))
    try:
        await other.acquire(name)  # known to it, not throttled
        assert other.status()[name]["throttled"] is False
        await teller.throttled(name, retry_after=3.0)
        await other.refresh()
        status = other.status()[name]
        assert status["throttled"] is True
        assert 2.0 < status["paused_for_seconds"] <= 3.0
        with pytest.raises(MustWait):
            await other.acquire(name)
    finally:
        await cleanup(client, name)


async def test_a_new_limit_applies_from_the_next_start(client: aioredis.Redis) -> None:
    """The same dependency at 2/s, then (a restarted worker) at 50/s: the new pace applies at once."""
    name = dependency()
    slow = Limiter(client, {name: DependencyLimits(requests_per_second=2)}, max_wait=5)
    try:
        await (await slow.acquire(name)).release()
        fast = Limiter(client, {name: DependencyLimits(requests_per_second=50)}, max_wait=5)
        started = time.monotonic()
        for _ in range(20):
            await (await fast.acquire(name)).release()
        # At 2/s these would take 10 s; at 50/s 0.4 s, plus at most the 0.5 s left of the old slot.
        assert time.monotonic() - started < 2.0
    finally:
        await cleanup(client, name)


async def test_an_answers_tokens_are_learned_from_the_reported_usage(client: aioredis.Redis) -> None:
    """Until an answer was seen, a call reserves 256 tokens for it; after, what answers used (a moving average)."""
    name = dependency()
    limiter = Limiter(client, {name: DependencyLimits(tokens_per_minute=6_000_000)}, max_wait=5)
    try:
        first = await limiter.acquire(name, tokens=50)
        assert first.tokens == 50 + DEFAULT_ANSWER_TOKENS
        await first.release(used_tokens=50 + 40)  # the answer used 40
        second = await limiter.acquire(name, tokens=30)
        assert second.tokens == 30 + 40
        await second.release(used_tokens=30 + 90)  # then 90: the estimate moves a fifth of the way
        third = await limiter.acquire(name, tokens=10)
        assert third.tokens == 10 + round(40 + ANSWER_WEIGHT * (90 - 40))
        await third.release(used_tokens=0)  # refused by the provider: nothing learned
        assert limiter.dependency(name).answers_seen == 2
    finally:
        await cleanup(client, name)
