"""The business logic (in the project: `handlers/`): no broker, no database, its dependency handed in."""

from __future__ import annotations

from docs_src.writing_a_flow.schemas import SummariseTicket, TicketSummarised
from handlers.ports import CompletionModel
from schemas import MessageContext


async def summarise(cmd: SummariseTicket, ctx: MessageContext, model: CompletionModel) -> TicketSummarised:
    """Ask the model for a one-line summary; the message id is the provider's idempotency key."""
    prompt = f"Summarise this support ticket in one line:\n\n{cmd.text}"
    answer = await model.complete(prompt, model="echo", idempotency_key=ctx.message_id)
    return TicketSummarised(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        ticket_id=cmd.ticket_id,
        summary=answer.text.splitlines()[-1][:200],
    )
