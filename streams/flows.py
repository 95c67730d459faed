"""The flows: which command, which store stream, which `*.failed` event."""

from __future__ import annotations

from schemas import (
    CompletionFailed,
    CompletionRequested,
    EmailFailed,
    Event,
    FailureKind,
    MessageContext,
    RequestCompletion,
    SendEmail,
)
from streams.pipeline import Flow


def _email_failed(cmd: SendEmail, ctx: MessageContext, kind: FailureKind, reason: str) -> Event:
    return EmailFailed(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        to=str(cmd.to),
        reason=reason[:2000],
        failure_kind=kind,
    )


def _completion_failed(cmd: RequestCompletion, ctx: MessageContext, kind: FailureKind, reason: str) -> Event:
    return CompletionFailed(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        task_id=cmd.task_id,
        model=cmd.model,
        reason=reason[:2000],
        failure_kind=kind,
    )


EMAIL: Flow[SendEmail] = Flow(
    name="email",
    command=SendEmail,
    dependency="mailer",
    stream_id=lambda cmd, ctx: f"email-{ctx.message_id}",
    failed=_email_failed,
)
COMPLETION: Flow[RequestCompletion] = Flow(
    name="completion",
    command=RequestCompletion,
    dependency="llm",
    stream_id=lambda cmd, ctx: f"completion-{cmd.task_id}",
    failed=_completion_failed,
    requested=lambda cmd, ctx: CompletionRequested(
        message_id=ctx.message_id, correlation_id=ctx.correlation_id, task_id=cmd.task_id, model=cmd.model
    ),
)
