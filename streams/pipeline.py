"""The one wrapper every message goes through: record and publish the outcome, or classify the failure."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Generic, TypeVar

from prometheus_client import Histogram

from handlers.errors import DependencyUnavailableError, InvalidMessageError, PipelineError
from schemas import Command, Event, FailureKind, MessageContext, MessageDeadLettered, RetryScheduled
from streams import faults, metrics, names, topology
from streams.alerts import Alerter
from streams.breaker import Breaker
from streams.envelope import Envelope, Transport
from streams.failures import Failure, classify
from streams.logging import get_logger
from streams.monitor import Monitor
from streams.outlets import Outlet
from streams.relay import Relay
from streams.settings import Settings
from streams.store import Commit, EventStore, Outcome
from streams.suspects import CrashLedger, Isolation, ledger_key, run_counted

log = get_logger("pipeline")

C = TypeVar("C", bound=Command)


# Handlers of one batch running at once: a crash charges each of them (streams.suspects).
HANDLERS_AT_ONCE = 16


class Admission(Enum):
    """What `Pipeline.admit` decided for a delivery."""

    REFUSED = "refused"  # parked (oversize, poison) or already done: not handled
    SHARED = "shared"  # handled beside the others
    ALONE = "alone"  # a suspect: its worker died inside its handler before; handled alone


class PoisonMessageError(PipelineError):
    """Raised when a message was delivered again and again without an outcome: it kills its worker."""


@dataclass(frozen=True, slots=True)
class Flow(Generic[C]):
    """One command's route: its store stream, and the `*.failed` event it ends with when it fails for good."""

    name: str
    command: type[C]
    dependency: str  # the side effect it needs; one circuit breaker per dependency
    stream_id: Callable[[C, MessageContext], str]
    failed: Callable[[C, MessageContext, FailureKind, str], Event]
    # An event recorded (not published) when the command first arrives, before the handler runs.
    requested: Callable[[C, MessageContext], Event] | None = None


class Delivery:
    """One message in flight: its envelope, and, once decoded, its command and flow."""

    __slots__ = ("command", "envelope", "flow")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.command: Command | None = None
        self.flow: Flow[Command] | None = None


class Pipeline:
    """Records outcome events, publishes them, and delays or parks what failed."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        alerter: Alerter | None = None,
        crashes: CrashLedger | None = None,
    ) -> None:
        self.settings = settings
        # Redelivered messages run alone and have their starts counted (streams.suspects); without
        # a ledger, the broker's delivery count decides what is poison.
        self.crashes = crashes
        self.isolation = Isolation()
        self.store = store
        self.alerter = alerter or Alerter(str(settings.alert_url) if settings.alert_url else None)
        self.outlets: dict[Transport, Outlet] = {}
        self.relay = Relay(store, self.outlets, orphaned_after=settings.outbox_orphan_seconds)
        self.relay.listen()  # outcomes go out from memory as they are committed
        self.breakers: dict[str, Breaker] = {}
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
        # Redelivered: did its worker die inside its handler (streams.suspects)? A message that only
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
        # A suspect runs alone: if it kills the worker again, nothing else is charged.
        isolation = self.isolation
        async with isolation.exclusive() if admission is Admission.ALONE else isolation.shared():
            try:
                await handle()
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                await self.fail(delivery, exc)

    async def run(self, delivery: Delivery, flow: Flow[C], cmd: C, handle: Callable[[], Awaitable[Event]]) -> None:
        """Run the handler of a decoded command once, and commit its outcome with the inbox entry."""
        delivery.command = cmd
        delivery.flow = flow  # type: ignore[assignment]  # Flow is invariant; C is a Command
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
        outcome = await self._through_breaker(flow.dependency, env, handle)
        faults.crash_at("after_handler", env.body)
        done = await self.store.commit(Commit(stream_id, [outcome], env, consumer=flow.name))
        if done.outcome is Outcome.DUPLICATE:
            metrics.DUPLICATES.labels(env.transport, env.source).inc()
            log.info("duplicate skipped at commit", stream_id=stream_id)
            return
        self.relay.kick()
        if env.published_at is not None:
            metrics.END_TO_END.labels(env.transport, flow.name).observe(max(time.time() - env.published_at, 0.0))
        faults.crash_at("after_commit", env.body)
        log.info("handled", event_type=outcome.TYPE, attempt=env.attempt)

    async def run_batch(
        self,
        flow: Flow[C],
        batch: Sequence[tuple[Delivery, C]],
        handler: Callable[[C, MessageContext], Awaitable[Event]],
        committed: Callable[[Sequence[BaseException | None]], None] | None = None,
    ) -> list[BaseException | None]:
        """`run` for first deliveries of one flow, decoded, side by side, while its breaker is closed.

        What `run` does one message at a time is done here once for all: one inbox query, one
        crash-ledger round trip each way, the handlers concurrently, the outcomes into the group
        commit together. Returns, per delivery, None when it is done (handled or a duplicate) or
        the exception it failed with, for `fail` to classify as it would from `run`. `committed`
        gets those same results once the outcomes are committed, before their publish is awaited:
        what is done then may be acknowledged (the outbox holds its outcome).
        """
        for delivery, cmd in batch:
            delivery.command = cmd
            delivery.flow = flow  # type: ignore[assignment]  # Flow is invariant; C is a Command
        results: list[BaseException | None] = [None] * len(batch)
        seen = await self.store.seen_many(flow.name, [d.envelope.message_id for d, _ in batch])
        todo: list[int] = []
        for i, (delivery, _) in enumerate(batch):
            if seen[i]:  # redelivered or re-published after its outcome was committed
                env = delivery.envelope
                metrics.DUPLICATES.labels(env.transport, env.source).inc()
                log.info("duplicate skipped", **_ids(env))
            else:
                todo.append(i)
        if flow.requested is not None:
            await self._requested_batch(flow, batch, [i for i in todo if batch[i][0].envelope.attempt == 1], results)
            todo = [i for i in todo if results[i] is None]
        outcomes = await self._handle_batch(flow, [batch[i] for i in todo], handler)
        done: list[tuple[int, Event]] = []
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results[i] = outcome
            else:
                faults.crash_at("after_handler", batch[i][0].envelope.body)
                done.append((i, outcome))
        await self._commit_batch(flow, batch, done, results, committed)
        return results

    async def _requested_batch(
        self, flow: Flow[C], batch: Sequence[tuple[Delivery, C]], first: list[int], results: list[BaseException | None]
    ) -> None:
        """Record the `requested` event of first attempts, before their handlers run."""
        assert flow.requested is not None
        units = []
        for i in first:
            delivery, cmd = batch[i]
            ctx = delivery.envelope.context
            units.append(Commit(flow.stream_id(cmd, ctx), [flow.requested(cmd, ctx)], delivery.envelope, publish=False))
        for i, done in zip(first, await self.store.commit_many(units), strict=True):
            if isinstance(done, BaseException):
                results[i] = done

    async def _handle_batch(
        self,
        flow: Flow[C],
        batch: Sequence[tuple[Delivery, C]],
        handler: Callable[[C, MessageContext], Awaitable[Event]],
    ) -> list[Event | BaseException]:
        """The handlers, at most `HANDLERS_AT_ONCE` at a time, counted in the crash ledger, reported to the breaker.

        A worker that dies charges a crash to every handler counted at that moment: the bound
        keeps the innocent neighbours of a poison message few (each then runs alone once). The
        handlers of a turn share one ledger call (`suspects.run_counted`).
        """

        async def one(env: Envelope, cmd: C) -> Event:
            faults.crash_at("before_handler", env.body)
            return await handler(cmd, env.context)

        outcomes = await run_counted(
            self.crashes,
            [(ledger_key(d.envelope), functools.partial(one, d.envelope, cmd)) for d, cmd in batch],
            HANDLERS_AT_ONCE,
        )
        breaker = self.breaker(flow.dependency)
        if any(not isinstance(o, BaseException) for o in outcomes):
            await breaker.success()
        for outcome in outcomes:
            if isinstance(outcome, DependencyUnavailableError):
                await breaker.failure()
        return outcomes

    async def _commit_batch(
        self,
        flow: Flow[C],
        batch: Sequence[tuple[Delivery, C]],
        done: list[tuple[int, Event]],
        results: list[BaseException | None],
        committed: Callable[[Sequence[BaseException | None]], None] | None = None,
    ) -> None:
        """Commit each outcome with its inbox entry, the commits sharing transactions; then publish them."""
        units = []
        for i, outcome in done:
            delivery, cmd = batch[i]
            units.append(
                Commit(flow.stream_id(cmd, delivery.envelope.context), [outcome], delivery.envelope, consumer=flow.name)
            )
        now = time.time()
        # Looked up once a batch, not once a message: the histogram of each transport, and
        # whether a "handled" line would be written at all.
        latency: dict[Transport, Histogram] = {}
        logging_handled = log.isEnabledFor(logging.INFO)
        for (i, outcome), written in zip(done, await self.store.commit_many(units), strict=True):
            env = batch[i][0].envelope
            if isinstance(written, BaseException):
                results[i] = written
            elif written.outcome is Outcome.DUPLICATE:
                metrics.DUPLICATES.labels(env.transport, env.source).inc()
                log.info("duplicate skipped at commit", **_ids(env))
            else:
                if env.published_at is not None:
                    if env.transport not in latency:
                        latency[env.transport] = metrics.END_TO_END.labels(env.transport, flow.name)
                    latency[env.transport].observe(max(now - env.published_at, 0.0))
                faults.crash_at("after_commit", env.body)
                if logging_handled:
                    log.info("handled", event_type=outcome.TYPE, attempt=env.attempt, **_ids(env))
        if committed is not None:
            committed(results)
        if units:
            await self.relay.publish_committed()

    async def _through_breaker(self, dependency: str, env: Envelope, handle: Callable[[], Awaitable[Event]]) -> Event:
        """Wait while the dependency's breaker is open, run the handler, tell the breaker how it went."""
        breaker = self.breaker(dependency)
        await breaker.acquire()
        # Every run is counted from here until the handler returns: a worker that dies in between
        # leaves the count up, and the redelivered message is then a suspect. A crash while it
        # waited above, or after it (commit, ack, relay), is not charged to it.
        ledger = self.crashes
        if ledger is not None:
            await ledger.handler_started(env)
        faults.crash_at("before_handler", env.body)
        try:
            outcome = await handle()
        except DependencyUnavailableError:
            await breaker.failure()
            raise
        except BaseException:
            await breaker.release()
            raise
        finally:
            if ledger is not None:
                await ledger.handler_returned(env)
        await breaker.success()
        return outcome

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
                await self._retry(delivery, failure, delay)
                return
            await self.dead_letter(delivery, failure)
            return
        await self.dead_letter(delivery, Failure.of(exc, kind, env))

    async def _retry(self, delivery: Delivery, failure: Failure, delay: float) -> None:
        env = delivery.envelope
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
        if delivery.command is not None and delivery.flow is not None:
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
        replayed_from = env.headers.get("x-replayed-from", "")
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


def _ids(env: Envelope) -> dict[str, str]:
    """A message's ids for a log line written outside its own context (a batch)."""
    return {"message_id": env.message_id, "correlation_id": env.correlation_id, "queue": env.source}


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)
