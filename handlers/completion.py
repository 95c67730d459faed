"""Completion flow: `RequestCompletion` -> `CompletionSucceeded`."""

from __future__ import annotations

from handlers.ports import CompletionModel
from schemas import CompletionSucceeded, MessageContext, RequestCompletion


async def complete(cmd: RequestCompletion, ctx: MessageContext, model: CompletionModel) -> CompletionSucceeded:
    """Run the prompt through the model named in the command."""
    answer = await model.complete(cmd.prompt, model=cmd.model, idempotency_key=ctx.message_id)
    return CompletionSucceeded(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        task_id=cmd.task_id,
        model=cmd.model,
        completion=answer.text,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
    )
