"""What a flow is: one command, its handler and dependency, where it is consumed, what it ends with.

A flow is declared once (`streams.flows.catalog`); the subscribers on both brokers, the reclaiming Redis
subscriber, the topology and the AsyncAPI entries all follow from the declaration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from schemas import Event, FailureKind, MessageContext
from schemas.base import Message

C = TypeVar("C", bound=Message)  # a command model


@dataclass(frozen=True, slots=True)
class Flow(Generic[C]):
    """One command's route from its queue and stream through its handler to its outcome events."""

    name: str  # also the inbox consumer: a message id is handled once per flow
    command: type[C]
    # The business logic (handlers/): the command, what it may know of its message, its dependency.
    handler: Callable[[C, MessageContext, Any], Awaitable[Event]]
    dependency: str  # the side effect it needs (`mailer`, `llm`); one circuit breaker each
    provide: Callable[[], Awaitable[Any]]  # the FastStream `Depends` target that hands it over
    queue: str  # RabbitMQ quorum queue, bound to exchange `tasks` under its own name
    stream: str  # Redis stream
    group: str  # Redis consumer group
    stream_id: Callable[[C, MessageContext], str]  # the event-store stream its events go to
    failed: Callable[[C, MessageContext, FailureKind, str], Event]  # its `*.failed` event
    outcomes: tuple[type[Event], ...]  # the events it publishes on `events` (success and failure)
    description: str = ""
    # An event recorded (not published) when the command first arrives, before the handler runs.
    requested: Callable[[C, MessageContext], Event] | None = None
    # For a dependency limited in tokens (PIPELINE_LIMITS `tokens_per_minute`): the tokens a command's
    # input is expected to use (the limiter adds the answer's, learned from reported usage), and
    # those its outcome reports, settled after the call.
    tokens: Callable[[C], int] | None = None
    used_tokens: Callable[[Event], int | None] | None = None
