"""Replaying dead letters: what goes back on the wire (pure), pacing, and the replay loop.

A replayed message carries its original bytes, message id and correlation id, without the
failure and retry headers (so the attempt count starts again at 1), and `x-replayed-from`
naming the dead letter. A row is marked replayed only after the broker confirmed the publish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from faststream.redis.parser.binary import BinaryMessageFormatV1
from sqlalchemy.ext.asyncio import AsyncEngine

from streams.core import names
from streams.deadletters.model import DeadLetter, decode_fields
from streams.deadletters.queries import mark_replayed

H_REPLAYED_FROM = names.H_REPLAYED_FROM
DATA_KEY = b"__data__"
# What the pipeline and the broker add on failure; dropped on replay so the message starts afresh.
FAILURE_HEADERS = frozenset(
    {
        names.H_FAILURE_KIND,
        names.H_ATTEMPTS,
        names.H_FIRST_FAILURE_AT,
        names.H_LAST_FAILURE_AT,
        names.H_ORIGINAL_QUEUE,
        "x-delivery-count",
        "x-death",
        H_REPLAYED_FROM,  # a dead letter replayed before names its own, older, origin
    }
)
# x-exception-* from the pipeline; x-first-death-* / x-last-death-* from RabbitMQ's own dead-lettering.
FAILURE_HEADER_PREFIXES = ("x-exception-", "x-first-death-", "x-last-death-")

Publish = Callable[[DeadLetter], Awaitable[str]]  # returns where the message went


def is_failure_header(key: str | bytes) -> bool:
    """True for a header (or Redis field) the failure and retry path added."""
    name = (key.decode("utf-8", "replace") if isinstance(key, bytes) else key).lower()
    return name in FAILURE_HEADERS or name.startswith(FAILURE_HEADER_PREFIXES)


def replay_headers(headers: Mapping[str, Any], dead_letter_id: int) -> dict[str, Any]:
    """The original headers without failure and retry headers, plus `x-replayed-from`."""
    kept = {k: v for k, v in headers.items() if not is_failure_header(k)}
    kept[H_REPLAYED_FROM] = str(dead_letter_id)
    return kept


@dataclass(frozen=True, slots=True)
class RabbitReplay:
    """A replayed RabbitMQ message: default exchange, routing key = the original queue, persistent."""

    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str
    content_type: str | None
    headers: dict[str, Any]


def rabbit_replay(letter: DeadLetter) -> RabbitReplay:
    """The RabbitMQ message that replays `letter`: body untouched, ids kept, failure headers gone."""
    content_type = letter.headers.get("content-type")
    return RabbitReplay(
        routing_key=letter.queue,
        body=letter.body,
        message_id=letter.message_id,
        correlation_id=letter.correlation_id,
        content_type=str(content_type) if content_type else None,
        headers=replay_headers(letter.headers, letter.id),
    )


async def redis_entry(letter: DeadLetter) -> dict[bytes, bytes]:
    """The Redis entry that replays `letter`: its fields verbatim, minus failure fields, ids kept.

    A FastStream entry keeps its body bytes; only the headers inside its `__data__` envelope
    change. A plain entry (no `__data__`) gets its ids and `x-replayed-from` as fields.
    """
    if letter.fields is None:  # never written by the pipeline, but the row has all we need
        source = {DATA_KEY: await _envelope(letter.body, letter.headers, letter)}
    else:
        source = decode_fields(letter.fields)
    entry = {k: v for k, v in source.items() if not is_failure_header(k)}
    data = entry.get(DATA_KEY)
    if data is not None:
        body, headers = BinaryMessageFormatV1.parse(data)
        entry[DATA_KEY] = await _envelope(body, headers, letter)
        return entry
    entry.setdefault(names.H_MESSAGE_ID.encode(), letter.message_id.encode())
    entry.setdefault(names.H_CORRELATION_ID.encode(), letter.correlation_id.encode())
    entry[H_REPLAYED_FROM.encode()] = str(letter.id).encode()
    return entry


async def _envelope(body: bytes, headers: Mapping[str, Any], letter: DeadLetter) -> bytes:
    kept = replay_headers(headers, letter.id)
    # Without any id the message id was derived from the old entry id: pin it as a header.
    kept.setdefault(names.H_MESSAGE_ID, letter.message_id)
    correlation_id = str(kept.get("correlation_id") or letter.correlation_id)
    return await BinaryMessageFormatV1.encode(
        message=body, reply_to=None, headers={k: str(v) for k, v in kept.items()}, correlation_id=correlation_id
    )


class Throttle:
    """Lets at most `rate` calls of `wait()` through per second (no limit when `rate` is None)."""

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.clock = clock
        self.sleep = sleep
        self._next: float | None = None

    async def wait(self) -> None:
        """Return when the next call is allowed."""
        if not self.interval:
            return
        now = self.clock()
        if self._next is not None and self._next > now:
            await self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


async def replay(
    engine: AsyncEngine,
    letters: Sequence[DeadLetter],
    publish: Publish,
    *,
    throttle: Throttle | None = None,
    on_replayed: Callable[[DeadLetter, str], None] | None = None,
) -> int:
    """Publish each dead letter, then mark it replayed (one UPDATE each); stops at the first failure."""
    throttle = throttle or Throttle(None)
    for letter in letters:
        await throttle.wait()
        where = await publish(letter)
        await mark_replayed(engine, letter.id)
        if on_replayed is not None:
            on_replayed(letter, where)
    return len(letters)
