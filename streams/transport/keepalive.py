"""Keep the Redis entries this worker holds its own while it lives.

Entries a worker has read but not yet acknowledged (in flight, waiting at an open breaker, left
running after their batch) sit in the group's pending list and age. Reclaiming subscribers take
entries idle longer than PIPELINE_REDIS_CLAIM_IDLE_MS, which must only happen when the worker that
read them died. So every third of that time this task re-claims the entries this process holds,
by id, with XCLAIM JUSTID: their idle time starts again, no delivery is counted. By id, not by
consumer name: the workers of a deployment may share one name (the AsyncAPI document's), and an
entry a dead worker left must age until a reclaimer takes it.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from streams.core.periodic import Periodic


class PendingKeepalive(Periodic):
    """Background task that refreshes the idle time of the entries this process holds."""

    name = "redis-pending-keepalive"
    quiet_failures = True  # Redis being down shows in /health/ready

    def __init__(self, client: aioredis.Redis, groups: dict[str, str], consumer: str, claim_idle_ms: int) -> None:
        self.refresh_after_ms = max(claim_idle_ms // 3, 1)
        super().__init__(self.refresh_after_ms / 1000)
        self.client = client
        self.groups = dict(groups)  # stream -> group
        self.consumer = consumer
        self.held: dict[str, set[str]] = {stream: set() for stream in self.groups}

    def hold(self, stream: str, entry_ids: Iterable[str | None]) -> None:
        """This process read these entries: keep them its own until `release`."""
        self.held.setdefault(stream, set()).update(i for i in entry_ids if i is not None)

    def release(self, stream: str, entry_ids: Iterable[str | None]) -> None:
        """These entries are acknowledged, parked or left to the broker."""
        held = self.held.get(stream)
        if held is not None:
            held.difference_update(entry_ids)

    async def tick(self) -> None:
        await self.refresh()

    async def refresh(self) -> int:
        """Refresh the held entries idle for a third of the claim time; returns how many."""
        refreshed = 0
        for stream, ids in self.held.items():
            group = self.groups.get(stream)
            if not ids or group is None:
                continue
            claimed = await self.client.xclaim(
                stream, group, self.consumer, self.refresh_after_ms, list(ids), justid=True
            )
            refreshed += len(claimed)
        return refreshed
