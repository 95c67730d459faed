"""What operators watch: per-source activity, queue depth and stream lag, outbox backlog.

The middleware reports each message's start and end here; a sampler refreshes the gauges
that need a broker or database round trip every few seconds, and `/health/consumers` reads
the latest values.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from streams.core import metrics
from streams.core.logging import get_logger
from streams.core.periodic import Periodic

log = get_logger("pipeline.monitor")


@dataclass
class SourceActivity:
    """One queue or stream as this worker sees it."""

    gauge: Any  # its `pipeline_in_flight` child, looked up once (labels() is not cheap)
    in_flight: int = 0
    handled: int = 0
    last_message_at: float | None = None  # wall clock, seconds
    depth: int | None = None  # RabbitMQ ready messages / Redis lag + pending


class Monitor(Periodic):
    """Activity per (broker, source), and a background sampler for depth, lag and outbox."""

    name = "monitor"

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__(interval)
        self.sources: dict[tuple[str, str], SourceActivity] = {}
        self.samplers: list[Callable[[], Awaitable[None]]] = []

    def activity(self, broker: str, source: str) -> SourceActivity:
        """The activity record of one source."""
        act = self.sources.get((broker, source))
        if act is None:
            act = self.sources[(broker, source)] = SourceActivity(metrics.IN_FLIGHT.labels(broker, source))
        return act

    def started(self, broker: str, source: str, count: int = 1) -> None:
        """A message (or `count`) of `source` began."""
        act = self.activity(broker, source)
        act.in_flight += count
        act.last_message_at = time.time()
        act.gauge.set(act.in_flight)

    def finished(self, broker: str, source: str, count: int = 1) -> None:
        """A message (or `count`) of `source` ended (whatever its outcome)."""
        act = self.activity(broker, source)
        act.in_flight = max(act.in_flight - count, 0)
        act.handled += count
        act.gauge.set(act.in_flight)

    async def sample(self) -> None:
        """Refresh every sampled gauge once; a failing sampler never stops the others."""
        for sampler in self.samplers:
            try:
                await asyncio.wait_for(sampler(), 5)
            except Exception as exc:  # noqa: BLE001 - an unreachable broker is reported by health
                log.debug("sampler failed", sampler=getattr(sampler, "__name__", "?"), error=repr(exc))

    async def tick(self) -> None:
        await self.sample()
