"""The routing table: every flow, declared once.

| flow       | command           | RabbitMQ queue  | Redis stream (group)           | handler             |
|------------|-------------------|-----------------|--------------------------------|---------------------|
| email      | SendEmail         | `email`         | `email` (`email-workers`)      | handlers.email      |
| completion | RequestCompletion | `ai.completion` | `ai.completion` (`ai-workers`) | handlers.completion |

Queues are bound to exchange `tasks` under their own names. Every outcome goes to `events` on the
broker the command came from.
"""

from __future__ import annotations

from handlers import completion, email
from schemas import (
    CompletionFailed,
    CompletionRequested,
    CompletionSucceeded,
    EmailFailed,
    EmailSent,
    Event,
    FailureKind,
    MessageContext,
    RequestCompletion,
    SendEmail,
)
from streams.core import names
from streams.flows.deps import get_mailer, get_model
from streams.flows.flow import Flow


def estimated_tokens(prompt: str) -> int:
    """A prompt's tokens, estimated without a tokenizer: about four characters a token."""
    return -(-len(prompt) // 4)


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
    handler=email.send_email,
    dependency="mailer",
    provide=get_mailer,
    queue=names.EMAIL_QUEUE,
    stream=names.EMAIL_STREAM,
    group=names.EMAIL_GROUP,
    stream_id=lambda cmd, ctx: f"email-{ctx.message_id}",
    failed=_email_failed,
    outcomes=(EmailSent, EmailFailed),
    description="Send an e-mail; answers `email.sent` or `email.failed`.",
)
COMPLETION: Flow[RequestCompletion] = Flow(
    name="completion",
    command=RequestCompletion,
    handler=completion.complete,
    dependency="llm",
    provide=get_model,
    queue=names.COMPLETION_QUEUE,
    stream=names.COMPLETION_STREAM,
    group=names.COMPLETION_GROUP,
    stream_id=lambda cmd, ctx: f"completion-{cmd.task_id}",
    failed=_completion_failed,
    outcomes=(CompletionSucceeded, CompletionFailed),
    description="Run an LLM completion; answers `completion.succeeded` or `completion.failed`.",
    requested=lambda cmd, ctx: CompletionRequested(
        message_id=ctx.message_id, correlation_id=ctx.correlation_id, task_id=cmd.task_id, model=cmd.model
    ),
    tokens=lambda cmd: estimated_tokens(cmd.prompt),
    used_tokens=lambda event: (
        event.prompt_tokens + event.completion_tokens if isinstance(event, CompletionSucceeded) else None
    ),
)

FLOWS: tuple[Flow[SendEmail] | Flow[RequestCompletion], ...] = (EMAIL, COMPLETION)
