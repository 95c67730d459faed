"""The one wrapper every message goes through: record and publish the outcome, or classify the failure."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from handlers.errors import InvalidMessageError, PipelineError
from schemas import Command, Event, FailureKind, MessageContext, MessageDeadLettered
from streams import faults, metrics, names
from streams.alerts import Alerter
from streams.envelope import Envelope, Transport
from streams.failures import Failure, classify
from streams.logging import get_logger
from streams.outlets import Outlet
from streams.settings import Settings
from streams.store import EventStore

log = get_logger("pipeline")

C = TypeVar("C", bound=Command)


class PoisonMessageError(PipelineError):
    """Raised when a message was delivered again and again without an outcome: it kills its worker."""


@dataclass(frozen=True, slots=True)
class Flow(Generic[C]):
    """One command's route: its store stream, and the `*.failed` event it ends with when it fails for good."""

    name: str
    command: type[C]
    stream_id: Callable[[C, MessageContext], str]
    failed: Callable[[C, MessageContext, FailureKind, str], Event]


class Delivery:
    """One message in flight: its envelope, and, once decoded, its command and flow."""

    __slots__ = ("command", "envelope", "flow")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.command: Command | None = None
        self.flow: Flow[Command] | None = None


class Pipeline:
    """Records outcome events, publishes them, and delays or parks what failed."""

    def __init__(self, settings: Settings, store: EventStore, alerter: Alerter | None = None) -> None:
        self.settings = settings
        self.store = store
        self.alerter = alerter or Alerter(str(settings.alert_url) if settings.alert_url else None)
        self.outlets: dict[Transport, Outlet] = {}
        self.flows_by_source: dict[str, str] = {}
        self.rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def attach(self, outlet: Outlet) -> None:
        """Use `outlet` for messages of its transport."""
        self.outlets[outlet.transport] = outlet

    async def admit(self, delivery: Delivery, size: int) -> bool:
        """Refuse, before decoding, what is oversized or poison; True when the message may be handled."""
        env = delivery.envelope
        if size > self.settings.max_body_bytes:
            await self.fail(
                delivery, InvalidMessageError(f"body of {size} bytes exceeds {self.settings.max_body_bytes}")
            )
            return False
        if env.redeliveries >= self.settings.delivery_limit:
            exc = PoisonMessageError(
                f"delivered {env.redeliveries + 1} times without an outcome (limit {self.settings.delivery_limit})"
            )
            await self.dead_letter(delivery, Failure.of(exc, FailureKind.POISON, env))
            return False
        return True

    async def run(self, delivery: Delivery, flow: Flow[C], cmd: C, handle: Callable[[], Awaitable[Event]]) -> None:
        """Run the handler of a decoded command and record its outcome."""
        delivery.command = cmd
        delivery.flow = flow  # type: ignore[assignment]  # Flow is invariant; C is a Command
        env = delivery.envelope
        faults.crash_if_marked(env.body)
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

    async def fail(self, delivery: Delivery, exc: BaseException) -> None:
        """Classify a failure once: retry it later through the broker, or dead-letter it now."""
        env = delivery.envelope
        kind = classify(exc, decoded=delivery.command is not None)
        if kind is None:
            failure = Failure.of(exc, FailureKind.EXHAUSTED, env)
            flow = delivery.flow.name if delivery.flow is not None else env.source
            delay = self.settings.retry_policy(flow).next_delay(
                env.attempt, failure.first_failure_at, failure.last_failure_at, self.rng
            )
            if delay is not None:
                await self._retry(env, failure, delay)
                return
            await self.dead_letter(delivery, failure)
            return
        await self.dead_letter(delivery, Failure.of(exc, kind, env))

    async def _retry(self, env: Envelope, failure: Failure, delay: float) -> None:
        headers = {
            names.H_ATTEMPTS: str(env.attempt + 1),
            names.H_FIRST_FAILURE_AT: failure.first_failure_at.isoformat(),
            names.H_LAST_FAILURE_AT: failure.last_failure_at.isoformat(),
            names.H_EXCEPTION_TYPE: failure.exception_type,
            names.H_EXCEPTION_MESSAGE: failure.exception_message,
            names.H_MESSAGE_ID: env.message_id,
            names.H_CORRELATION_ID: env.correlation_id,
        }
        await self.outlets[env.transport].retry_later(env, delay, headers)
        metrics.RETRIES_SCHEDULED.labels(env.transport, env.source).inc()
        log.info(
            "retry scheduled",
            attempt=env.attempt,
            next_attempt=env.attempt + 1,
            delay_seconds=round(delay, 3),
            exception_type=failure.exception_type,
            exception_message=failure.exception_message,
        )

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        """Park the message with its story, keep it for review, alert, and say so in events."""
        env = delivery.envelope
        await self.outlets[env.transport].dead_letter(env, failure.headers(env))
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
        await self.alerter.dead_lettered(env, failure, dead_letter_id)

    async def close(self) -> None:
        """Release what the pipeline holds."""
        await self.alerter.close()


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)
