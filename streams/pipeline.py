"""The one wrapper every message goes through: record and publish the outcome, or classify the failure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from handlers.errors import InvalidMessageError
from schemas import Command, Event, FailureKind, MessageContext, MessageDeadLettered
from streams import metrics, names
from streams.envelope import Envelope, Transport
from streams.failures import Failure, classify
from streams.logging import get_logger
from streams.outlets import Outlet
from streams.settings import Settings
from streams.store import EventStore

log = get_logger("pipeline")

C = TypeVar("C", bound=Command)


@dataclass(frozen=True, slots=True)
class Flow(Generic[C]):
    """One command's route: its store stream, and the `*.failed` event it ends with when it fails for good."""

    name: str
    command: type[C]
    stream_id: Callable[[C, MessageContext], str]
    failed: Callable[[C, MessageContext, FailureKind, str], Event]


class Delivery:
    """One message in flight: its envelope, and whether its command got decoded."""

    __slots__ = ("command", "envelope", "flow")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.command: Command | None = None
        self.flow: Flow[Command] | None = None


class Pipeline:
    """Records outcome events, publishes them, and parks or delays what failed."""

    def __init__(self, settings: Settings, store: EventStore) -> None:
        self.settings = settings
        self.store = store
        self.outlets: dict[Transport, Outlet] = {}

    def attach(self, outlet: Outlet) -> None:
        """Use `outlet` for messages of its transport."""
        self.outlets[outlet.transport] = outlet

    async def run(self, delivery: Delivery, flow: Flow[C], cmd: C, handle: Callable[[], Awaitable[Event]]) -> None:
        """Run the handler of a decoded command and record its outcome."""
        delivery.command = cmd
        delivery.flow = flow  # type: ignore[assignment]  # Flow is invariant; C is a Command
        env = delivery.envelope
        outcome = await handle()
        await self.record(env, flow.stream_id(cmd, env.context), [outcome])
        log.info("handled", event_type=outcome.TYPE, attempt=env.attempt)

    async def record(self, env: Envelope, stream_id: str, evts: list[Event]) -> None:
        """Append events to the store, then publish them on the message's own broker."""
        await self.store.append(stream_id, evts, env)
        outlet = self.outlets[env.transport]
        for ev in evts:
            await outlet.publish_event(ev)
            metrics.EVENTS_PUBLISHED.labels(env.transport, ev.TYPE).inc()

    async def reject_invalid(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a message refused before decoding (e.g. oversized)."""
        await self.fail(delivery, InvalidMessageError(reason))

    async def fail(self, delivery: Delivery, exc: BaseException) -> None:
        """Classify a failure once; dead-letter it or schedule a retry."""
        env = delivery.envelope
        kind = classify(exc, decoded=delivery.command is not None)
        if kind is None:
            kind = await self._retry_or_exhaust(env, exc)
            if kind is None:
                return
        await self.dead_letter(delivery, Failure.of(exc, kind, env))

    async def _retry_or_exhaust(self, env: Envelope, exc: BaseException) -> FailureKind | None:
        """Schedule a retry if attempts remain (None); else the message is exhausted."""
        # Broker-held retries with backoff arrive with the recoverability work; until then a
        # transient failure is dead-lettered as exhausted, so it is parked, never lost.
        del env, exc
        return FailureKind.EXHAUSTED

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        """Park the message with its story, keep it for review, and say so in events."""
        env = delivery.envelope
        headers = failure.headers(env)
        outlet = self.outlets[env.transport]
        await outlet.dead_letter(env, headers)
        dead_letter_id = await self.store.record_dead_letter(env, failure)
        metrics.DEAD_LETTERS.labels(env.transport, env.source, failure.kind.value).inc()
        log.warning(
            "dead-lettered",
            failure_kind=failure.kind.value,
            exception_type=failure.exception_type,
            exception_message=failure.exception_message,
            attempts=failure.attempts,
            dead_letter_id=dead_letter_id,
        )
        ctx = env.context
        outcome: list[Event] = []
        stream_id = f"deadletter-{env.message_id}"
        if delivery.command is not None and delivery.flow is not None:
            flow = delivery.flow
            outcome.append(flow.failed(delivery.command, ctx, failure.kind, failure.exception_message))
            stream_id = flow.stream_id(delivery.command, ctx)
        outcome.append(
            MessageDeadLettered(
                message_id=env.message_id,
                correlation_id=env.correlation_id,
                queue=env.source,
                dead_letter_queue=names.dlq(env.source),
                failure_kind=failure.kind,
                exception_type=failure.exception_type,
                exception_message=failure.exception_message,
                attempts=failure.attempts,
            )
        )
        await self.record(env, stream_id, outcome)
