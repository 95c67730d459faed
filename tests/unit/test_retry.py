"""The retry policy and the RabbitMQ delay-level routing, as pure functions."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta

import pytest

from streams.core.retry import RetryPolicy
from streams.core.settings import Settings
from streams.transport import topology

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_ceiling_doubles_from_the_base_and_stops_at_the_max() -> None:
    """Attempt n waits up to base * 2^(n-1), never more than max_delay."""
    policy = RetryPolicy(base_delay=1, max_delay=10)
    assert [policy.ceiling(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize(("jitter", "low", "high"), [("full", 0.0, 1.0), ("equal", 0.5, 1.0), ("none", 1.0, 1.0)])
def test_jitter_keeps_every_delay_within_its_band(jitter: str, low: float, high: float) -> None:
    """Full jitter spreads over [0, ceiling], equal over [ceiling/2, ceiling], none is the ceiling."""
    policy = RetryPolicy(base_delay=2, max_delay=100, jitter=jitter)  # type: ignore[arg-type]
    rng = random.Random(7)
    for attempt in range(1, 8):
        ceiling = policy.ceiling(attempt)
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(low * ceiling <= d <= high * ceiling for d in delays)
    if jitter == "full":
        assert len({round(d, 6) for d in delays}) > 100, "jitter actually spreads the delays"


def test_no_retry_after_the_last_attempt() -> None:
    """The attempt cap: attempt max_attempts failing gives up."""
    policy = RetryPolicy(max_attempts=3, jitter="none")
    assert policy.next_delay(1, NOW, NOW) == 1
    assert policy.next_delay(2, NOW, NOW) == 2
    assert policy.next_delay(3, NOW, NOW) is None


def test_no_retry_past_the_maximum_age() -> None:
    """The age cap: a retry that would land after max_age since the first failure is not scheduled."""
    policy = RetryPolicy(max_attempts=100, base_delay=10, max_delay=10, max_age=60, jitter="none")
    first = NOW - timedelta(seconds=45)
    assert policy.next_delay(2, first, NOW) == 10
    assert policy.next_delay(2, first - timedelta(seconds=10), NOW) is None


def test_per_flow_overrides_take_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIPELINE_RETRY_OVERRIDES changes one flow's limits and leaves the others on the globals."""
    monkeypatch.setenv("PIPELINE_RETRY_OVERRIDES", '{"completion": {"max_attempts": 2, "max_delay": 30}}')
    monkeypatch.setenv("PIPELINE_RETRY_MAX_ATTEMPTS", "7")
    settings = Settings()
    assert (settings.retry_policy("completion").max_attempts, settings.retry_policy("completion").max_delay) == (2, 30)
    assert settings.retry_policy("email").max_attempts == 7


def _route(routing_key: str) -> tuple[float, str]:
    """Follow a message through the delay levels as RabbitMQ would: (seconds held, destination)."""
    held = 0.0
    for level in reversed(range(topology.DELAY_LEVELS)):
        pattern = topology._skip(level) + "1.#"  # the binding to the level's queue
        regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\#", ".*") + "$"
        if re.match(regex, routing_key):
            held += 2**level
    return held, routing_key.split(".", topology.DELAY_LEVELS)[-1]


@pytest.mark.parametrize("seconds", [0, 1, 2, 3, 7, 300, 1234.2, 65_535])
def test_delay_routing_key_holds_the_message_exactly_that_long(seconds: float) -> None:
    """Passing through the levels whose bit is set holds a message ceil(delay) seconds, then sends it home."""
    held, destination = _route(topology.delay_routing_key(seconds, "ai.completion"))
    assert held == min(-(-seconds // 1), 2**topology.DELAY_LEVELS - 1)
    assert destination == "ai.completion"


def test_delays_beyond_the_top_level_are_capped() -> None:
    """A delay longer than the levels can hold is capped at 2^16 - 1 seconds, never wrapped around."""
    held, _ = _route(topology.delay_routing_key(10**9, "email"))
    assert held == 2**topology.DELAY_LEVELS - 1
