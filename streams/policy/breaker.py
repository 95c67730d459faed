"""Circuit breakers, one per dependency: while open, handlers that need it wait instead of failing.

Only transient failures of the dependency itself count (`DependencyUnavailableError`); invalid
and fatal messages never do. After `threshold` consecutive such failures the breaker opens;
messages that need the dependency then wait at the gate, unhandled, so no attempt is burned,
and the subscriber's prefetch / read window fills up so the broker stops handing out more: the
queue or stream grows instead. After `recovery` seconds it lets `probes` messages through
(half-open); a success closes it, a failure opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from enum import IntEnum

from streams.core import metrics
from streams.core.logging import get_logger

log = get_logger("pipeline.breaker")


class State(IntEnum):
    """Breaker states, as exported in `pipeline_breaker_state`."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """A consecutive-failure circuit breaker with a waiting gate."""

    def __init__(self, name: str, *, threshold: int = 5, recovery: float = 30.0, probes: int = 1) -> None:
        self.name = name
        self.threshold = threshold
        self.recovery = recovery
        self.probes = probes
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.in_probe = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.BREAKER_STATE.labels(name).set(self.state)

    @property
    def closed(self) -> bool:
        """True while messages use the dependency freely."""
        return self.state is State.CLOSED

    @property
    def status(self) -> State:
        """The state as health reports it: an open breaker whose recovery time passed lets the next
        message through (half-open), whether or not one has arrived yet."""
        if self.state is State.OPEN and time.monotonic() >= self.opened_at + self.recovery:
            return State.HALF_OPEN
        return self.state

    @property
    def _cond(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        return self._changed

    def _set(self, state: State) -> None:
        if state is self.state:
            return
        log.warning(
            "circuit breaker changed",
            dependency=self.name,
            old=self.state.name.lower(),
            new=state.name.lower(),
            consecutive_failures=self.failures,
        )
        self.state = state
        metrics.BREAKER_STATE.labels(self.name).set(state)

    async def acquire(self) -> None:
        """Wait until a message may use the dependency."""
        if self.closed:  # the common case: nothing to wait for, nothing to change
            return
        cond = self._cond
        async with cond:
            while True:
                if self.state is State.OPEN and time.monotonic() >= self.opened_at + self.recovery:
                    self._set(State.HALF_OPEN)
                if self.state is State.CLOSED:
                    return
                if self.state is State.HALF_OPEN and self.in_probe < self.probes:
                    self.in_probe += 1
                    return
                wait = None
                if self.state is State.OPEN:
                    wait = max(self.opened_at + self.recovery - time.monotonic(), 0.01)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait(), wait)

    async def success(self) -> None:
        """The dependency answered: close."""
        if self.closed and not self.failures:  # nothing changes, and nobody waits while closed
            return
        async with self._cond:
            self.failures = 0
            if self.state is State.HALF_OPEN:
                self.in_probe = max(self.in_probe - 1, 0)
            self._set(State.CLOSED)
            self._cond.notify_all()

    async def failure(self) -> None:
        """The dependency failed transiently: count, and open at the threshold or on a failed probe."""
        async with self._cond:
            self.failures += 1
            if self.state is State.HALF_OPEN:
                self.in_probe = max(self.in_probe - 1, 0)
                self._open()
            elif self.state is State.CLOSED and self.failures >= self.threshold:
                self._open()
            self._cond.notify_all()

    async def release(self) -> None:
        """A probe ended without saying anything about the dependency (e.g. a fatal error)."""
        async with self._cond:
            if self.state is State.HALF_OPEN:
                self.in_probe = max(self.in_probe - 1, 0)
            self._cond.notify_all()

    def _open(self) -> None:
        self.opened_at = time.monotonic()
        self._set(State.OPEN)
