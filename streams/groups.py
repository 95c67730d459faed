"""Keep Redis consumer groups alive: re-create a group lost to a Redis restart, instead of exiting.

FastStream 0.7 stops a stream subscriber for good on NOGROUP and asks the app to exit (which
would take the RabbitMQ side down with it). A Redis that restarts without persistence loses
every group, so here each stream subscriber re-creates its group (XGROUP CREATE ... MKSTREAM
from id 0, so nothing published after the restart is skipped) and goes on reading.
"""

from __future__ import annotations

from typing import Any

import anyio
from faststream.redis import StreamGroupNotFoundError
from redis.exceptions import RedisError, ResponseError

from streams import metrics
from streams.logging import get_logger

log = get_logger("pipeline.groups")
RETRY_SECONDS = 1.0


async def ensure_group(client: Any, stream: str, group: str) -> bool:
    """Create the group (and the stream) when missing; True when it had to be created."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


def keep_group_alive(subscriber: Any) -> None:
    """Patch one FastStream stream subscriber so NOGROUP re-creates its group and reading resumes."""
    lost = anyio.Event()
    holder = {"lost": lost}
    original_stop = subscriber._stop_on_terminal_error
    original_consume = subscriber._consume

    async def on_terminal_error(exc: Exception, msg: str) -> None:
        if isinstance(exc, StreamGroupNotFoundError):
            holder["lost"].set()
            return
        await original_stop(exc, msg)

    async def consume(*args: Any, start_signal: Any) -> None:
        while True:
            await original_consume(*args, start_signal=start_signal)
            if not (subscriber.running and holder["lost"].is_set()):
                return
            holder["lost"] = anyio.Event()
            stream = subscriber.stream_sub
            while subscriber.running:
                try:
                    await ensure_group(subscriber._client, stream.name, stream.group)
                    break
                except RedisError as exc:
                    log.warning("cannot re-create consumer group yet", stream=stream.name, error=repr(exc))
                    await anyio.sleep(RETRY_SECONDS)
            metrics.GROUPS_RECREATED.labels(stream.name, stream.group).inc()
            log.warning(
                "consumer group was lost (Redis restarted?); re-created it", stream=stream.name, group=stream.group
            )

    subscriber._stop_on_terminal_error = on_terminal_error
    subscriber._consume = consume
