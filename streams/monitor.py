"""What operators watch: per-source activity, queue depth and stream lag, outbox backlog.

The middleware reports each message's start and end here; a sampler refreshes the gauges
that need a broker or database round trip every few seconds, and `/health/consumers` reads
the latest values.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from streams import metrics
from streams.logging import get_logger

log = get_logger("pipeline.monitor")


@dataclass
class SourceActivity:
    """One queue or stream as this worker sees it."""

    gauge: Any  # its `pipeline_in_flight` child, looked up once (labels() is not cheap)
    in_flight: int = 0
    handled: int = 0
    last_message_at: float | None = None  # wall clock, seconds
    depth: int | None = None  # RabbitMQ ready messages / Redis lag + pending


class Monitor:
    """Activity per (broker, source), and a background sampler for depth, lag and outbox."""

    def __init__(self) -> None:
        self.sources: dict[tuple[str, str], SourceActivity] = {}
        self.samplers: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def activity(self, broker: str, source: str) -> SourceActivity:
        """The activity record of one source."""
        act = self.sources.get((broker, source))
        if act is None:
            act = self.sources[(broker, source)] = SourceActivity(metrics.IN_FLIGHT.labels(broker, source))
        return act

    def started(self, broker: str, source: str) -> None:
        """A message of `source` began."""
        act = self.activity(broker, source)
        act.in_flight += 1
        act.last_message_at = time.time()
        act.gauge.set(act.in_flight)

    def finished(self, broker: str, source: str) -> None:
        """A message of `source` ended (whatever its outcome)."""
        act = self.activity(broker, source)
        act.in_flight = max(act.in_flight - 1, 0)
        act.handled += 1
        act.gauge.set(act.in_flight)

    def start(self, interval: float = 5.0) -> None:
        """Sample every `interval` seconds in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(interval), name="monitor")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sample(self) -> None:
        """Refresh every sampled gauge once; a failing sampler never stops the others."""
        for sampler in self.samplers:
            try:
                await asyncio.wait_for(sampler(), 5)
            except Exception as exc:  # noqa: BLE001 - an unreachable broker is reported by health
                log.debug("sampler failed", sampler=getattr(sampler, "__name__", "?"), error=repr(exc))

    async def _run(self, interval: float) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(interval)
