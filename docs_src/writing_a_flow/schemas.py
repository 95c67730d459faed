"""The flow's messages: one command in, its outcome events out (in the project: `schemas/`)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from schemas import Event, FailureKind
from schemas.base import Message


class SummariseTicket(Message):
    """Summarise a support ticket in one line. Outcome: `ticket.summarised` or `ticket.summary_failed`."""

    ticket_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    text: Annotated[str, Field(min_length=1, max_length=20_000)]


class TicketSummarised(Event):
    """The model summarised the ticket."""

    TYPE: ClassVar[str] = "ticket.summarised"
    type: Literal["ticket.summarised"] = "ticket.summarised"
    ticket_id: str
    summary: str


class TicketSummaryFailed(Event):
    """The ticket could not be summarised and will not be retried."""

    TYPE: ClassVar[str] = "ticket.summary_failed"
    type: Literal["ticket.summary_failed"] = "ticket.summary_failed"
    ticket_id: str
    reason: Annotated[str, Field(max_length=2000)]
    failure_kind: FailureKind
