"""The one wrapper every message goes through: record and publish the outcome, or classify the failure."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

from handlers.errors import DependencyUnavailableError, InvalidMessageError, PipelineError, ThrottledError
from schemas import Event, FailureKind, MessageDeadLettered, RetryScheduled
from schemas.base import Message
from streams.core import faults, metrics, names
from streams.core.envelope import Envelope, Transport
from streams.core.logging import get_logger
from streams.core.settings import Settings
from streams.eventstore.relay import Relay
from streams.eventstore.store import Commit, EventStore, Outcome
from streams.flows.flow import Flow
from streams.ops.monitor import Monitor
from streams.policy.alerts import Alerter
from streams.policy.breaker import Breaker
from streams.policy.failures import Failure, classify
from streams.policy.limits import Limiter, MustWait
from streams.policy.suspects import CrashLedger, Isolation
from streams.transport import topology
from streams.transport.outlets import Outlet

log = get_logger("pipeline")

C = TypeVar("C", bound=Message)  # a command model


class Admission(Enum):
    """What `Pipeline.admit` decided for a delivery."""

    REFUSED = "refused"  # parked (oversize, poison) or already done: not handled
    SHARED = "shared"  # handled beside the others
    ALONE = "alone"  # a suspect: its worker died inside its handler before; handled alone


class PoisonMessageError(PipelineError):
    """Raised when a message was delivered again and again without an outcome: it kills its worker."""


class Delivery:
    """One message in flight: its envelope, and, once decoded, its command and flow."""

    __slots__ = ("command", "envelope", "flow")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.command: Message | None = None
        self.flow: Flow[Any] | None = None


class Pipeline:
    """Records outcome events, publishes them, and delays or parks what failed."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        alerter: Alerter | None = None,
        crashes: CrashLedger | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        # Redelivered messages run alone and have their starts counted (streams.policy.suspects); without
        # a ledger, the broker's delivery count decides what is poison.
        self.crashes = crashes
        self.isolation = Isolation()
        self.store = store
        self.alerter = alerter or Alerter(str(settings.alert_url) if settings.alert_url else None)
        self.outlets: dict[Transport, Outlet] = {}
        self.relay = Relay(store, self.outlets, orphaned_after=settings.outbox_orphan_seconds)
        self.relay.listen()  # outcomes go out from memory as they are committed
        self.breakers: dict[str, Breaker] = {}
        # Without a shared limiter (tests, tools) a worker only holds back on its own providers' pushback.
        self.limiter = limiter or Limiter(None, {}, max_wait=settings.limit_max_wait)
        self.monitor = Monitor()
        self.flow_of_source: dict[str, str] = {}  # queue or stream -> flow name (the inbox consumer)
        self.rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def breaker(self, dependency: str) -> Breaker:
        """The circuit breaker of one dependency (created on first use)."""
        if dependency not in self.breakers:
            self.breakers[dependency] = Breaker(
                dependency,
                threshold=self.settings.breaker_threshold,
                recovery=self.settings.breaker_recovery_seconds,
                probes=self.settings.breaker_probes,
            )
        return self.breakers[dependency]

    def add_flow(self, flow: Flow[Any]) -> None:
        """Know a flow: its queue and stream name its inbox consumer; its dependency gets a breaker."""
        self.flow_of_source[flow.queue] = flow.name
        self.flow_of_source[flow.stream] = flow.name
        self.breaker(flow.dependency)  # visible in health from the start

    def attach(self, outlet: Outlet) -> None:
        """Use `outlet` for messages of its transport."""
        self.outlets[outlet.transport] = outlet

    async def admit(self, delivery: Delivery) -> Admission:
        """Refuse, before decoding, what is oversized or poison; say whether the rest runs alone."""
        env = delivery.envelope
        size = env.size
        if size > self.settings.max_body_bytes:
            await self.fail(
                delivery, InvalidMessageError(f"body of {size} bytes exceeds {self.settings.max_body_bytes}")
            )
            return Admission.REFUSED
        if env.redeliveries == 0:
            return Admission.SHARED
        # Redelivered: did its worker die inside its handler (streams.policy.suspects)? A message that only
        # sat prefetched beside the one that killed the worker did not, and runs as usual.
        if self.crashes is None:  # no ledger: every redelivery is a suspect, the broker's count decides
            crashes, alone = env.redeliveries, True
        else:
            crashes = await self.crashes.crashes(env)
            alone = crashes > 0
        if crashes < self.settings.delivery_limit and env.redeliveries < topology.BROKER_DELIVERY_LIMIT - 1:
            return Admission.ALONE if alone else Admission.SHARED
        flow = self.flow_of_source.get(env.source)
        if flow is not None and await self.store.seen(flow, env.message_id):
            # Its outcome was committed before the crashes: it is done, not poison.
            metrics.DUPLICATES.labels(env.transport, env.source).inc()
            return Admission.REFUSED
        exc = PoisonMessageError(
            f"its worker died {crashes} times while handling it, delivered {env.redeliveries + 1} times "
            f"(limit {self.settings.delivery_limit})"
        )
        # Parked alone: a crash caused by another message while this one is between parked and
        # acknowledged would park it twice.
        async with self.isolation.exclusive():
            await self.dead_letter(delivery, Failure.of(exc, FailureKind.POISON, env))
        return Admission.REFUSED

    async def process(self, delivery: Delivery, handle: Callable[[], Awaitable[object]]) -> None:
        """One delivery start to end: admit it, run `handle` (decode and `run`) beside the others or
        alone, and classify whatever it raised. Raises only when the failure could not be handled
        (the broker or the database is down): the consumer then leaves the message to the broker."""
        admission = await self.admit(delivery)
        if admission is Admission.REFUSED:
            return
        await self.guarded(delivery, handle, alone=admission is Admission.ALONE)

    async def guarded(
        self, delivery: Delivery, handle: Callable[[], Awaitable[object]], *, alone: bool = False
    ) -> None:
        """Run `handle` for an admitted delivery, beside the others or `alone`, and classify whatever it raised."""
        # A suspect runs alone: if it kills the worker again, nothing else is charged.
        isolation = self.isolation
        async with isolation.exclusive() if alone else isolation.shared():
            try:
                await handle()
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                await self.fail(delivery, exc)

    async def run(self, delivery: Delivery, flow: Flow[C], cmd: C, handle: Callable[[], Awaitable[Event]]) -> None:
        """Run the handler of a decoded command once, and commit its outcome with the inbox entry."""
        delivery.command = cmd
        delivery.flow = flow
        env = delivery.envelope
        ctx = env.context
        stream_id = flow.stream_id(cmd, ctx)
        if await self.store.seen(flow.name, env.message_id):
            # Redelivered or re-published after its outcome was committed: no second effect.
            metrics.DUPLICATES.labels(env.transport, env.source).inc()
            log.info("duplicate skipped", stream_id=stream_id)
            return
        if flow.requested is not None and env.attempt == 1:
            await self.store.commit(Commit(stream_id, [flow.requested(cmd, ctx)], env, publish=False))
        outcome = await self._call(flow, cmd, env, handle)
        faults.crash_at("after_handler", env.body)
        done = await self.store.commit(Commit(stream_id, [outcome], env, consumer=flow.name))
        if done.outcome is Outcome.DUPLICATE:
            metrics.DUPLICATES.labels(env.transport, env.source).inc()
            log.info("duplicate skipped at commit", stream_id=stream_id)
            return
        self.relay.kick()
        await self.relay.room()  # outcomes go out no slower than they are committed
        if env.published_at is not None:
            metrics.END_TO_END.labels(env.transport, flow.name).observe(max(time.time() - env.published_at, 0.0))
        faults.crash_at("after_commit", env.body)
        log.info("handled", event_type=outcome.TYPE, attempt=env.attempt)

    async def _call(self, flow: Flow[C], cmd: C, env: Envelope, handle: Callable[[], Awaitable[Event]]) -> Event:
        """Wait while the dependency's breaker is open, then for its limits; run the handler, tell both how it went."""
        dependency = flow.dependency
        breaker = self.breaker(dependency)
        await breaker.acquire()
        try:
            permit = await self.limiter.acquire(dependency, flow.tokens(cmd) if flow.tokens else 0)
        except BaseException:
            await breaker.release()
            raise
        # Every run is counted from here until the handler returns: a worker that dies in between
        # leaves the count up, and the redelivered message is then a suspect. A crash while it
        # waited above, or after it (commit, ack, relay), is not charged to it.
        ledger = self.crashes
        if ledger is not None:
            await ledger.handler_started(env)
        faults.crash_at("before_handler", env.body)
        try:
            outcome = await handle()
        except ThrottledError as exc:  # the provider is up and says "later": not the breaker's business
            await breaker.release()
            await permit.release(used_tokens=0)
            await self.limiter.throttled(dependency, exc.retry_after)
            raise
        except DependencyUnavailableError:
            await breaker.failure()
            await permit.release()
            raise
        except BaseException:
            await breaker.release()
            await permit.release()
            raise
        finally:
            if ledger is not None:
                await ledger.handler_returned(env)
        await breaker.success()
        await permit.release(used_tokens=flow.used_tokens(outcome) if flow.used_tokens else None)
        return outcome

    async def fail(self, delivery: Delivery, exc: BaseException) -> None:
        """Classify a failure once: retry it later through the broker, or dead-letter it now."""
        env = delivery.envelope
        if isinstance(exc, ThrottledError | MustWait) and delivery.command is not None:
            await self._wait_on_broker(delivery, exc)
            return
        kind = classify(exc, decoded=delivery.command is not None)
        if kind is None:
            failure = Failure.of(exc, FailureKind.EXHAUSTED, env)
            flow = delivery.flow.name if delivery.flow is not None else env.source
            delay = self.settings.retry_policy(flow).next_delay(
                env.attempt, failure.first_failure_at, failure.last_failure_at, self.rng
            )
            if delay is not None:
                await self._retry(delivery, failure, delay)
                return
            await self.dead_letter(delivery, failure)
            return
        await self.dead_letter(delivery, Failure.of(exc, kind, env))

    async def _wait_on_broker(self, delivery: Delivery, exc: ThrottledError | MustWait) -> None:
        """The dependency is at its limit or pushed back: the message waits on the broker, its attempt unused.

        Spread over up to a second more than asked, so waiting messages do not all come back at once.
        It is dead-lettered only when waiting would take it past the retry policy's maximum age.
        """
        env = delivery.envelope
        wait = exc.retry_after if isinstance(exc, ThrottledError) else exc.seconds
        delay = wait + self.rng.uniform(0.0, min(max(wait, 0.1), 1.0))
        failure = Failure.of(exc, FailureKind.EXHAUSTED, env)
        flow = delivery.flow.name if delivery.flow is not None else env.source
        max_age = self.settings.retry_policy(flow).max_age
        if (failure.last_failure_at - failure.first_failure_at).total_seconds() + delay > max_age:
            await self.dead_letter(delivery, failure)
            return
        await self._retry(delivery, failure, delay, attempt=env.attempt, record=isinstance(exc, ThrottledError))

    async def _retry(
        self, delivery: Delivery, failure: Failure, delay: float, *, attempt: int | None = None, record: bool = True
    ) -> None:
        """Hand the message back to the broker for `delay` seconds as attempt `attempt` (default: the next)."""
        env = delivery.envelope
        next_attempt = env.attempt + 1 if attempt is None else attempt
        headers = {
            names.H_ATTEMPTS: str(next_attempt),
            names.H_FIRST_FAILURE_AT: failure.first_failure_at.isoformat(),
            names.H_LAST_FAILURE_AT: failure.last_failure_at.isoformat(),
            names.H_EXCEPTION_TYPE: failure.exception_type,
            names.H_EXCEPTION_MESSAGE: failure.exception_message,
            names.H_MESSAGE_ID: env.message_id,
            names.H_CORRELATION_ID: env.correlation_id,
        }
        await self.outlets[env.transport].retry_later(env, delay, headers)
        if attempt is not None:  # a wait, not a retry
            log.debug("waiting on the broker", delay_seconds=round(delay, 3), reason=failure.exception_message)
        else:
            metrics.RETRIES_SCHEDULED.labels(env.transport, env.source).inc()
        if record and delivery.command is not None and delivery.flow is not None:
            scheduled = RetryScheduled(
                message_id=env.message_id,
                correlation_id=env.correlation_id,
                queue=env.source,
                attempt=env.attempt,
                delay_seconds=round(delay, 3),
                exception_type=failure.exception_type,
                exception_message=failure.exception_message,
            )
            stream_id = delivery.flow.stream_id(delivery.command, env.context)
            await self.store.commit(Commit(stream_id, [scheduled], env, publish=False))
        if attempt is not None:
            return
        log.info(
            "retry scheduled",
            attempt=env.attempt,
            next_attempt=next_attempt,
            delay_seconds=round(delay, 3),
            exception_type=failure.exception_type,
            exception_message=failure.exception_message,
        )

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        """Park the message with its story, keep it for review, alert, and say so in events."""
        env = delivery.envelope
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
        # Recorded first, then parked, then the parking recorded: a crash before the park
        # redelivers the message, which is then parked without a second record; a crash after it
        # (before the ack) finds it parked and only acknowledges. The key is this failure's, so a
        # replay that fails again is recorded and parked again.
        replayed_from = env.headers.get(names.H_REPLAYED_FROM, "")
        key = f"dead-letter:{failure.kind.value}:{env.attempt}:{replayed_from}"
        # Written once the broker confirmed the parked copy. Its digest covers the queue and the
        # bytes too: two different messages a producer sent under one id are each parked.
        digest = hashlib.blake2b(digest_size=12)
        for part in (env.transport, env.source, key):
            digest.update(part.encode() + b"\x00")
        digest.update(env.body)
        parked = f"parked:{digest.hexdigest()}"
        done = await self.store.commit(Commit(stream_id, outcome, env, consumer=key[:64], dead_letter=failure))
        if done.outcome is Outcome.DUPLICATE and await self.store.seen(parked, env.message_id):
            # Recorded and parked before a crash took the acknowledgement: only the ack was missing.
            log.warning("dead letter already parked before a crash; acknowledged now")
            return
        await self.outlets[env.transport].dead_letter(env, failure.headers(env))
        await self.store.commit(Commit(stream_id, (), env, consumer=parked, publish=False))
        if done.outcome is Outcome.DUPLICATE:
            log.warning("dead letter parked again after a crash; already recorded", failure_kind=failure.kind.value)
            return
        metrics.DEAD_LETTERS.labels(env.transport, env.source, failure.kind.value).inc()
        self.relay.kick()
        log.warning(
            "dead-lettered",
            failure_kind=failure.kind.value,
            exception_type=failure.exception_type,
            exception_message=failure.exception_message,
            attempts=failure.attempts,
            dead_letter_id=done.dead_letter_id,
        )
        await self.alerter.dead_lettered(env, failure, done.dead_letter_id or 0)

    async def close(self) -> None:
        """Release what the pipeline holds."""
        await self.alerter.close()


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)
