"""Keep this worker's pending Redis entries its own while it lives.

Entries a worker has read but not yet acknowledged (in flight, waiting at an open breaker, or
buffered for a free handler slot) sit in its pending list and age. Reclaiming subscribers take
entries idle longer than PIPELINE_REDIS_CLAIM_IDLE_MS, which must only happen when their
consumer died. So every third of that time this task re-claims its own idle entries with
XCLAIM JUSTID, which resets their idle time without counting a delivery.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from streams.periodic import Periodic

BATCH = 1000


class PendingKeepalive(Periodic):
    """Background task that refreshes this consumer's idle pending entries."""

    name = "redis-pending-keepalive"
    quiet_failures = True  # Redis being down shows in /health/ready

    def __init__(
        self, client: aioredis.Redis, streams: Sequence[tuple[str, str]], consumer: str, claim_idle_ms: int
    ) -> None:
        self.refresh_after_ms = max(claim_idle_ms // 3, 1)
        super().__init__(self.refresh_after_ms / 1000)
        self.client = client
        self.streams = tuple(streams)
        self.consumer = consumer

    async def tick(self) -> None:
        await self.refresh()

    async def refresh(self) -> int:
        """Refresh every entry of ours idle for a third of the claim time; returns how many."""
        refreshed = 0
        for stream, group in self.streams:
            pending = await self.client.xpending_range(
                stream, group, min="-", max="+", count=BATCH, consumername=self.consumer, idle=self.refresh_after_ms
            )
            ids: list[int | bytes | str | memoryview[int]] = [p["message_id"] for p in pending]
            if ids:
                await self.client.xclaim(stream, group, self.consumer, 0, ids, justid=True)
                refreshed += len(ids)
        return refreshed
