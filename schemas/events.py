"""Outcome events: what happened (past-tense names), published on `events`."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal, TypeAlias

from pydantic import Field

from schemas.base import Message
from schemas.failures import FailureKind


def _now() -> datetime:
    return datetime.now(UTC)


def _event_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Time-ordered, as
    MassTransit's NewId, so the store's unique indexes on event ids grow at their end: random
    uuid4 ids would each dirty a page of their own there, which every COMMIT writes to the WAL."""
    rand = int.from_bytes(os.urandom(10))
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76  # version
        | (rand >> 62 & 0xFFF) << 64  # rand_a: 12 bits
        | 0b10 << 62  # variant
        | rand & _RAND_B
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_RAND_B = (1 << 62) - 1


class Event(Message):
    """Fields every event carries."""

    TYPE: ClassVar[str] = ""

    event_id: str = Field(default_factory=_event_id, description="Unique id of this event; dedupe on it.")
    occurred_at: datetime = Field(default_factory=_now, description="When it happened (UTC).")
    message_id: str = Field(description="Id of the command this event answers.", max_length=256)
    correlation_id: str = Field(description="Correlation id carried from the command.", max_length=256)


class EmailSent(Event):
    """The e-mail was accepted by the mail provider."""

    TYPE: ClassVar[str] = "email.sent"
    type: Literal["email.sent"] = "email.sent"
    to: str = Field(examples=["ada@example.com"])
    subject: str
    provider_id: str | None = Field(None, description="The provider's id for the sent mail.")


class EmailFailed(Event):
    """The e-mail could not be sent and will not be retried."""

    TYPE: ClassVar[str] = "email.failed"
    type: Literal["email.failed"] = "email.failed"
    to: str
    reason: Annotated[str, Field(max_length=2000)]
    failure_kind: FailureKind


class CompletionSucceeded(Event):
    """The model produced a completion for the task."""

    TYPE: ClassVar[str] = "completion.succeeded"
    type: Literal["completion.succeeded"] = "completion.succeeded"
    task_id: str
    model: str
    completion: str
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)


class CompletionFailed(Event):
    """The completion failed for good."""

    TYPE: ClassVar[str] = "completion.failed"
    type: Literal["completion.failed"] = "completion.failed"
    task_id: str
    model: str
    reason: Annotated[str, Field(max_length=2000)]
    failure_kind: FailureKind


class MessageDeadLettered(Event):
    """A message was parked in a dead-letter queue or stream for review and replay."""

    TYPE: ClassVar[str] = "message.dead_lettered"
    type: Literal["message.dead_lettered"] = "message.dead_lettered"
    queue: str = Field(description="Queue or stream the message came from.", examples=["email"])
    dead_letter_queue: str = Field(examples=["email.dlq"])
    failure_kind: FailureKind
    exception_type: str
    exception_message: Annotated[str, Field(max_length=2000)]
    attempts: int = Field(ge=0)


OutcomeEvent: TypeAlias = EmailSent | EmailFailed | CompletionSucceeded | CompletionFailed | MessageDeadLettered


class CompletionRequested(Event):
    """A completion command arrived (kept in the event store, not published)."""

    TYPE: ClassVar[str] = "completion.requested"
    type: Literal["completion.requested"] = "completion.requested"
    task_id: str
    model: str


class RetryScheduled(Event):
    """An attempt failed transiently and the broker holds the message for another (store only)."""

    TYPE: ClassVar[str] = "message.retry_scheduled"
    type: Literal["message.retry_scheduled"] = "message.retry_scheduled"
    queue: str
    attempt: int = Field(ge=1, description="The attempt that failed.")
    delay_seconds: float = Field(ge=0)
    exception_type: str
    exception_message: Annotated[str, Field(max_length=2000)]
