"""A Redis stream parser that never fails: an entry it cannot read still reaches the Pipeline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from faststream.message import StreamMessage

DATA_KEY = b"__data__"


async def tolerant_redis_parser(
    msg: Any, original: Callable[[Any], Awaitable[StreamMessage[Any]]]
) -> StreamMessage[Any]:
    """FastStream's parser; on an unreadable entry, an empty body (which then fails validation)."""
    try:
        return await original(msg)
    except Exception:  # noqa: BLE001 - the middleware dead-letters it as invalid, bytes intact
        parsed = await original({**msg, "data": {DATA_KEY: b""}})
        parsed.raw_message = msg  # keep the real entry for the dead letter
        return parsed
