"""Transport-neutral facts about one received message, read once from the raw broker message."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from schemas import MessageContext
from streams.core import names

Transport = Literal["rabbit", "redis"]
_DERIVED_NS = uuid.UUID("6f1d3c52-3a43-4d8e-9a55-0b6d6b1d2f10")


def derive_message_id(source: str, body: bytes) -> str:
    """A stable id for a message that came without one: same bytes, same queue, same id."""
    return str(uuid.uuid5(_DERIVED_NS, source + ":" + hashlib.sha256(body).hexdigest()))


def header_str(headers: Mapping[str, object], key: str) -> str | None:
    """A header as text, whatever type the broker handed it in."""
    value = headers.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def parse_attempt(raw: str | None) -> int:
    """The attempt number in `x-attempts`: 1 when absent, forged or out of range."""
    if raw is None:
        return 1
    try:
        value = int(raw)
    except ValueError:
        return 1
    return value if 1 <= value <= 1_000 else 1


def parse_count(raw: str | None) -> int:
    """A non-negative delivery count header; 0 when absent or unreadable."""
    try:
        return max(int(raw or 0), 0)
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Envelope:
    """One received message: where from, its ids, attempt, headers and its untouched bytes."""

    transport: Transport
    source: str  # queue or stream name
    message_id: str
    correlation_id: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    attempt: int = 1
    # Deliveries of this very message before this one that ended without an outcome (a crash).
    redeliveries: int = 0
    # Redis: the entry's fields as they were stored, to dead-letter or replay verbatim.
    fields: dict[bytes, bytes] | None = None
    entry_id: str | None = None
    # When the producer published it (epoch seconds), if the broker says.
    published_at: float | None = None

    @property
    def size(self) -> int:
        """Bytes on the wire: the body, or every field of a Redis entry."""
        if self.fields is None:
            return len(self.body)
        return sum(len(k) + len(v) for k, v in self.fields.items())

    @property
    def context(self) -> MessageContext:
        """What handlers may know about this message."""
        return MessageContext(self.message_id, self.correlation_id, self.attempt)

    def with_redeliveries(self, redeliveries: int) -> Envelope:
        """The same message, known to have been delivered `redeliveries` times before."""
        return replace(self, redeliveries=redeliveries)


def pick_ids(
    headers: Mapping[str, object],
    native_message_id: str | None,
    native_correlation_id: str | None,
    source: str,
    body: bytes,
) -> tuple[str, str]:
    """Message id and correlation id: the broker's own, else the header, else derived."""
    message_id = native_message_id or header_str(headers, names.H_MESSAGE_ID) or derive_message_id(source, body)
    correlation_id = native_correlation_id or header_str(headers, names.H_CORRELATION_ID) or message_id
    return storable(message_id)[:256], storable(correlation_id)[:256]


def storable(text: str) -> str:
    """Text a database keeps as it is: PostgreSQL refuses NUL characters in text, so they are escaped."""
    return text.replace("\x00", "\\x00")
