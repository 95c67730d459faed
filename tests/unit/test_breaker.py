"""The circuit breaker: opens on consecutive dependency failures, holds messages, probes, closes."""

from __future__ import annotations

import asyncio

import pytest

from streams.policy.breaker import Breaker, State


def state_of(breaker: Breaker) -> State:
    """The state now (a call, so the type checker does not carry narrowing across awaits)."""
    return breaker.state


def status_of(breaker: Breaker) -> State:
    """The state health reports now."""
    return breaker.status


async def test_opens_after_threshold_consecutive_failures() -> None:
    """Failures below the threshold keep it closed; the threshold-th opens it; a success resets the count."""
    breaker = Breaker("mailer", threshold=3, recovery=60)
    await breaker.failure()
    await breaker.failure()
    await breaker.success()
    await breaker.failure()
    await breaker.failure()
    assert state_of(breaker) is State.CLOSED
    await breaker.failure()
    assert state_of(breaker) is State.OPEN


async def test_open_breaker_holds_callers_until_recovery_then_lets_one_probe() -> None:
    """While open nobody passes; after the recovery time exactly `probes` callers pass (half-open)."""
    breaker = Breaker("mailer", threshold=1, recovery=0.2, probes=1)
    await breaker.failure()
    waiters = [asyncio.create_task(breaker.acquire()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters), "held while open"
    done, pending = await asyncio.wait(waiters, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    assert state_of(breaker) is State.HALF_OPEN
    await breaker.success()
    await asyncio.wait_for(asyncio.gather(*pending), 2)
    assert state_of(breaker) is State.CLOSED


async def test_failed_probe_opens_again() -> None:
    """A probe that fails re-opens the breaker for another recovery period."""
    breaker = Breaker("llm", threshold=1, recovery=0.05)
    await breaker.failure()
    await asyncio.wait_for(breaker.acquire(), 2)
    assert state_of(breaker) is State.HALF_OPEN
    await breaker.failure()
    assert state_of(breaker) is State.OPEN


async def test_probe_ending_without_verdict_frees_its_slot() -> None:
    """A probe that ends in a fatal error says nothing about the dependency: the next caller may probe."""
    breaker = Breaker("llm", threshold=1, recovery=0.05, probes=1)
    await breaker.failure()
    await asyncio.wait_for(breaker.acquire(), 2)
    second = asyncio.create_task(breaker.acquire())
    await asyncio.sleep(0.05)
    assert not second.done()
    await breaker.release()
    await asyncio.wait_for(second, 2)


@pytest.mark.parametrize("state", [State.CLOSED, State.HALF_OPEN, State.OPEN])
def test_state_values_are_the_exported_gauge_values(state: State) -> None:
    """The gauge `pipeline_breaker_state` reads 0 closed, 1 half-open, 2 open."""
    assert int(state) == {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}[state.name]


async def test_health_sees_an_open_breaker_as_half_open_once_its_recovery_passed() -> None:
    """With no message waiting, an open breaker is reported half-open after `recovery` (readiness comes back)."""
    breaker = Breaker("mailer", threshold=1, recovery=0.05)
    await breaker.failure()
    assert status_of(breaker) is State.OPEN
    deadline = asyncio.get_running_loop().time() + 5
    while status_of(breaker) is State.OPEN and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - a clock, nothing to await
        await asyncio.sleep(0.01)
    assert status_of(breaker) is State.HALF_OPEN
    assert state_of(breaker) is State.OPEN  # nothing changed: the next message is the probe
