"""Consumer groups that come back: every new Redis connection of the broker re-creates missing groups.

FastStream 0.7 stops a stream subscriber for good on NOGROUP and asks the app to exit. A Redis that
restarts without persistence loses every group, and the broker's next read after the restart comes
on a new connection: a connection class of ours (redis-py's public `connection_class` option,
which FastStream's RedisBroker passes on) creates each command stream's group as it connects
(XGROUP CREATE ... MKSTREAM from id 0, so nothing published after the restart is skipped), before
any read is sent on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ResponseError

from streams.core import metrics
from streams.core.logging import get_logger

log = get_logger("pipeline.groups")


async def ensure_group(client: Any, stream: str, group: str) -> bool:
    """Create the group (and the stream) when missing; True when it had to be created."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


def group_keeping_connection(url: str, groups: Iterable[tuple[str, str]]) -> type[Connection]:
    """A redis-py connection class (TLS for `rediss://`) that creates `groups` when it connects."""
    wanted = tuple(groups)
    base: type[Connection] = SSLConnection if url.startswith("rediss://") else Connection

    class GroupKeepingConnection(base):  # type: ignore[valid-type,misc]  # chosen at run time
        """A connection that makes sure the command streams' consumer groups exist."""

        async def on_connect_check_health(self, check_health: bool = True) -> None:
            await super().on_connect_check_health(check_health=check_health)
            for stream, group in wanted:
                await self.send_command("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
                try:
                    await self.read_response()
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                else:  # it was gone: Redis restarted without persistence, or someone deleted it
                    metrics.GROUPS_RECREATED.labels(stream, group).inc()
                    log.warning(
                        "consumer group was missing (a Redis restart?); re-created it", stream=stream, group=group
                    )

    return GroupKeepingConnection
