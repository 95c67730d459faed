"""The declaration (in the project: one more entry in `FLOWS`, `streams/flows/catalog.py`)."""

from __future__ import annotations

from docs_src.writing_a_flow.handler import summarise
from docs_src.writing_a_flow.schemas import SummariseTicket, TicketSummarised, TicketSummaryFailed
from schemas import Event, FailureKind, MessageContext
from streams.flows.deps import get_model
from streams.flows.flow import Flow


def _failed(cmd: SummariseTicket, ctx: MessageContext, kind: FailureKind, reason: str) -> Event:
    return TicketSummaryFailed(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        ticket_id=cmd.ticket_id,
        reason=reason[:2000],
        failure_kind=kind,
    )


SUMMARY: Flow[SummariseTicket] = Flow(
    name="summary",  # also the inbox consumer: a message id is handled once per flow
    command=SummariseTicket,
    handler=summarise,
    dependency="llm",  # shares the completion flow's circuit breaker (and its PIPELINE_LIMITS entry)
    provide=get_model,  # the FastStream `Depends` target: tests override it
    queue="ticket.summary",  # quorum queue bound to exchange `tasks` under this name
    stream="ticket.summary",  # Redis stream
    group="summary-workers",  # Redis consumer group
    stream_id=lambda cmd, ctx: f"ticket-{cmd.ticket_id}",  # the event-store stream of its events
    failed=_failed,
    outcomes=(TicketSummarised, TicketSummaryFailed),
    description="Summarise a support ticket; answers `ticket.summarised` or `ticket.summary_failed`.",
)
