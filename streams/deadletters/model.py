"""Dead letters as the review store holds them, which ones a command applies to, and safe text."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select

from streams.core import names
from streams.eventstore.tables import dead_letters

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^@\s/]+)@")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class DeadLetterError(Exception):
    """Raised when a dead-letter operation cannot be carried out; the text is shown as is."""


class StoreError(DeadLetterError):
    """Raised when the review store (the database) cannot be read or written."""


class BrokerError(DeadLetterError):
    """Raised when a broker cannot be reached or does not take a replayed message."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row of `dead_letters`."""

    id: int
    transport: str
    queue: str
    message_id: str
    correlation_id: str
    kind: str
    exception_type: str
    exception_message: str
    stacktrace: str
    attempts: int
    headers: dict[str, Any]
    body: bytes
    fields: dict[str, str] | None
    dead_lettered_at: datetime
    replayed_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DeadLetter:
        """A row as read; SQLite hands back naive datetimes, which were written in UTC."""
        data = dict(row)
        data["dead_lettered_at"] = utc(data["dead_lettered_at"])
        data["replayed_at"] = utc(data["replayed_at"]) if data["replayed_at"] is not None else None
        data["body"] = bytes(data["body"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command applies to."""

    queue: str | None = None
    kind: str | None = None
    include_replayed: bool = True

    def apply(self, query: Select[Any]) -> Select[Any]:
        """The query narrowed to this selection."""
        if self.queue is not None:
            query = query.where(dead_letters.c.queue == self.queue)
        if self.kind is not None:
            query = query.where(dead_letters.c.kind == self.kind)
        if not self.include_replayed:
            query = query.where(dead_letters.c.replayed_at.is_(None))
        return query


@dataclass(frozen=True, slots=True)
class PurgeGroup:
    """How many matching dead letters one (transport, queue, kind) holds."""

    transport: str
    queue: str
    kind: str
    count: int


@dataclass(frozen=True, slots=True)
class PurgePlan:
    """What a purge would delete: the matching rows up to `max_id`, so later arrivals are spared."""

    selection: Selection
    groups: tuple[PurgeGroup, ...]
    max_id: int

    @property
    def total(self) -> int:
        """Rows that would be deleted."""
        return sum(g.count for g in self.groups)

    @property
    def broker_queues(self) -> list[tuple[str, str]]:
        """(transport, dead-letter queue or stream) of every queue the matching rows came from."""
        return sorted({(g.transport, names.dlq(g.queue)) for g in self.groups})


# --- presentation helpers (pure) -----------------------------------------------------------------


def redact(text: str) -> str:
    """The text with every URL password replaced by `***`."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def printable(text: str) -> str:
    """The text with control characters (terminal escapes) shown as `\\xNN`; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def body_text(body: bytes) -> tuple[str, str]:
    """(`utf-8` or `hex`, the body as text): text when it decodes as UTF-8, else hex."""
    try:
        return "utf-8", printable(body.decode("utf-8"))
    except UnicodeDecodeError:
        return "hex", body.hex()


def decode_fields(fields: Mapping[str, str]) -> dict[bytes, bytes]:
    """A Redis entry's fields as stored (`{k.hex(): v.hex()}`), decoded."""
    try:
        return {bytes.fromhex(k): bytes.fromhex(v) for k, v in fields.items()}
    except ValueError as exc:
        raise DeadLetterError(f"the stored Redis fields are not hex-encoded: {exc}") from exc


def reason(exc: BaseException) -> str:
    """An exception as one line, passwords masked."""
    text = str(exc).strip() or repr(exc.__context__ or exc)
    return redact(" ".join(text.split()))


def utc(value: datetime) -> datetime:
    """A datetime read back from the database, in UTC (SQLite drops the zone it was written with)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
