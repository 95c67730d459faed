"""Pydantic models of the pipeline: commands in, events out, the failure envelope."""

from schemas.commands import Command, RequestCompletion, SendEmail
from schemas.context import MessageContext
from schemas.events import (
    CompletionFailed,
    CompletionRequested,
    CompletionSucceeded,
    EmailFailed,
    EmailSent,
    Event,
    MessageDeadLettered,
    OutcomeEvent,
    RetryScheduled,
)
from schemas.failures import FailureKind

__all__ = (
    "Command",
    "CompletionFailed",
    "CompletionRequested",
    "CompletionSucceeded",
    "EmailFailed",
    "EmailSent",
    "Event",
    "FailureKind",
    "MessageContext",
    "MessageDeadLettered",
    "OutcomeEvent",
    "RequestCompletion",
    "RetryScheduled",
    "SendEmail",
)
