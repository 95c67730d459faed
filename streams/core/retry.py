"""Retry policy as plain functions: exponential backoff with jitter, capped by attempts and by age."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Jitter = Literal["full", "equal", "none"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a transiently failed message again, and when to give up."""

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 300.0
    max_age: float = 86_400.0
    jitter: Jitter = "full"

    def ceiling(self, attempt: int) -> float:
        """The backoff ceiling after failed attempt `attempt` (1-based): base * 2**(attempt-1), capped."""
        return min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 62))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (AWS "full" or "equal" jitter)."""
        ceiling = self.ceiling(attempt)
        rand = (rng or random).random()
        if self.jitter == "full":
            return ceiling * rand
        if self.jitter == "equal":
            return ceiling / 2 + ceiling / 2 * rand
        return ceiling

    def next_delay(
        self, attempt: int, first_failure_at: datetime, now: datetime, rng: random.Random | None = None
    ) -> float | None:
        """The delay before the next attempt, or None when attempts or age are used up."""
        if attempt >= self.max_attempts:
            return None
        delay = self.delay(attempt, rng)
        if (now - first_failure_at).total_seconds() + delay > self.max_age:
            return None
        return delay
