"""How a message failed for good: the kinds carried in `x-failure-kind`."""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    """Why a message was dead-lettered."""

    INVALID = "invalid"  # undecodable, schema-invalid or oversized: never retried
    EXHAUSTED = "exhausted"  # transient failures until the attempt or age cap
    FATAL = "fatal"  # the handler's permanent error (e.g. a provider's 4xx)
    POISON = "poison"  # killed its worker until the delivery limit
