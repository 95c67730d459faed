"""Every name producers and operators rely on (DESIGN.md contract), in one place."""

from __future__ import annotations

from typing import Final

# RabbitMQ
TASKS_EXCHANGE: Final = "tasks"
EVENTS_EXCHANGE: Final = "events"
EMAIL_QUEUE: Final = "email"
COMPLETION_QUEUE: Final = "ai.completion"

# Redis Streams (same names as the queues, so `<name>.dlq` reads the same on both)
EMAIL_STREAM: Final = "email"
COMPLETION_STREAM: Final = "ai.completion"
EVENTS_STREAM: Final = "events"
EMAIL_GROUP: Final = "email-workers"
COMPLETION_GROUP: Final = "ai-workers"

# Outcome event types, also the RabbitMQ routing keys on `events`
EMAIL_SENT: Final = "email.sent"
EMAIL_FAILED: Final = "email.failed"
COMPLETION_SUCCEEDED: Final = "completion.succeeded"
COMPLETION_FAILED: Final = "completion.failed"
MESSAGE_DEAD_LETTERED: Final = "message.dead_lettered"

# Headers
H_MESSAGE_ID: Final = "message-id"
H_CORRELATION_ID: Final = "correlation-id"
H_EVENT_TYPE: Final = "event-type"
H_FAILURE_KIND: Final = "x-failure-kind"
H_EXCEPTION_TYPE: Final = "x-exception-type"
H_EXCEPTION_MESSAGE: Final = "x-exception-message"
H_EXCEPTION_STACKTRACE: Final = "x-exception-stacktrace"
H_ORIGINAL_QUEUE: Final = "x-original-queue"
H_ATTEMPTS: Final = "x-attempts"
H_FIRST_FAILURE_AT: Final = "x-first-failure-at"
H_LAST_FAILURE_AT: Final = "x-last-failure-at"
H_REPLAYED_FROM: Final = "x-replayed-from"  # a replayed dead letter: the id of its dead_letters row

# Every header a dead letter carries (DESIGN.md).
DEAD_LETTER_HEADERS: Final = (
    H_FAILURE_KIND,
    H_EXCEPTION_TYPE,
    H_EXCEPTION_MESSAGE,
    H_EXCEPTION_STACKTRACE,
    H_ORIGINAL_QUEUE,
    H_ATTEMPTS,
    H_FIRST_FAILURE_AT,
    H_LAST_FAILURE_AT,
    H_MESSAGE_ID,
    H_CORRELATION_ID,
)


def dlq(name: str) -> str:
    """The dead-letter queue or stream of a queue or stream."""
    return f"{name}.dlq"
