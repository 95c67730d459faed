"""Both flows on both brokers in memory (TestRabbitBroker / TestRedisBroker): outcomes, ids, bad input."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from faststream.rabbit import TestRabbitBroker
from faststream.redis import TestRedisBroker
from faststream.redis.parser.binary import BinaryMessageFormatV1

from handlers.errors import DeliveryRejectedError, DependencyUnavailableError, ThrottledError
from handlers.models import EchoModel
from schemas import SendEmail
from streams.core import names
from streams.core.envelope import Envelope
from streams.eventstore.store import EventStore
from streams.flows.deps import Adapters, install
from streams.policy.breaker import State
from streams.policy.limits import Limiter
from streams.transport import topology
from tests.conftest import CountingLedger, RecordingRedis

EMAIL = {"to": "ada@example.com", "subject": "Welcome", "body": "Hello Ada"}


def completion_cmd() -> dict[str, str]:
    return {"task_id": str(uuid.uuid4()), "prompt": "Say hi", "model": "echo"}


class FakeMailer:
    """Records sends; raises `error` when set."""

    def __init__(self) -> None:
        self.sent: list[tuple[SendEmail, str]] = []
        self.error: Exception | None = None

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str | None:
        if self.error is not None:
            raise self.error
        self.sent.append((mail, idempotency_key))
        return f"prov-{len(self.sent)}"


@dataclass
class Harness:
    """The app's brokers under TestBroker, with recording fakes around them."""

    module: Any
    mailer: FakeMailer
    store: EventStore
    redis_client: RecordingRedis
    dead_letters: list[tuple[Envelope, dict[str, str]]] = field(default_factory=list)
    retries: list[tuple[Envelope, float, dict[str, str]]] = field(default_factory=list)

    async def send(self, broker: str, queue: str, body: bytes | dict[str, Any], **props: Any) -> str:
        """Publish a command as a producer would; returns its message id."""
        mid: str = props.pop("message_id", str(uuid.uuid4()))
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        content_type = props.pop("content_type", "application/json")
        if broker == "rabbit":
            await self.module.rabbit.publish(
                raw,
                exchange=topology.TASKS,
                routing_key=queue,
                message_id=mid,
                correlation_id=props.pop("correlation_id", mid),
                content_type=content_type,
                **props,
            )
        else:
            headers = {"message-id": mid, **props.pop("headers", {})}
            await self.module.redis.publish(
                raw,
                stream=queue,
                headers={"content-type": content_type, **headers},
                correlation_id=props.pop("correlation_id", mid),
                **props,
            )
        await self.module.pipeline.relay.flush()  # outcomes leave through the outbox relay
        return mid

    def events(self, broker: str, event_type: str) -> list[dict[str, Any]]:
        """Decoded outcome events published on `events` of one broker, of one type."""
        pubs = self.module.publishers
        if broker == "rabbit":
            calls = pubs.rabbit_events[event_type].mock.call_args_list
            return [c.args[0] for c in calls]
        # On Redis the relay XADDs to stream `events` through the (here: recording) client.
        found = []
        for stream, fields in self.redis_client.added:
            if stream == names.EVENTS_STREAM:
                body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
                if headers.get(names.H_EVENT_TYPE) == event_type:
                    found.append(json.loads(body))
        return found


@pytest.fixture
async def harness(app_store: EventStore, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    from streams import app as module

    mailer = FakeMailer()
    module.pipeline.breakers.clear()  # each test starts with closed breakers
    install(Adapters(mailer=mailer, model=EchoModel()))
    fake_redis = RecordingRedis()
    monkeypatch.setattr(module.redis_outlet, "client", fake_redis)
    monkeypatch.setattr(module.pipeline, "crashes", CountingLedger())
    # Pushback stays in this process: the app's limiter would share it through the real Redis.
    monkeypatch.setattr(module.pipeline, "limiter", Limiter(None, {}, max_wait=module.settings.limit_max_wait))
    h = Harness(module=module, mailer=mailer, store=app_store, redis_client=fake_redis)
    for outlet in (module.rabbit_outlet, module.redis_outlet):
        original = outlet.dead_letter

        async def spy(env: Envelope, headers: dict[str, str], _orig: Any = original) -> None:
            h.dead_letters.append((env, headers))
            # In memory, TestRabbitBroker's recorder would try to JSON-decode a garbage dead
            # letter; the real publish is covered by the connected tests and the tests below.
            if env.transport == "redis" or _is_json(env.body):
                await _orig(env, headers)

        monkeypatch.setattr(outlet, "dead_letter", spy)

        original_retry = outlet.retry_later

        async def retry_spy(env: Envelope, delay: float, headers: dict[str, str], _orig: Any = original_retry) -> None:
            h.retries.append((env, delay, headers))
            # In memory there is no delay exchange to route to; Redis goes to the fake client.
            if env.transport == "redis":
                await _orig(env, delay, headers)

        monkeypatch.setattr(outlet, "retry_later", retry_spy)
    async with TestRabbitBroker(module.rabbit), TestRedisBroker(module.redis):
        yield h
    install(Adapters())


BROKERS = ["rabbit", "redis"]


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


@pytest.mark.parametrize("broker", BROKERS)
async def test_email_command_yields_one_email_sent_with_its_ids(harness: Harness, broker: str) -> None:
    """A valid SendEmail is sent once and answered by one `email.sent` carrying the command's ids."""
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL, correlation_id="corr-1")
    sent = harness.events(broker, names.EMAIL_SENT)
    assert len(sent) == 1
    event = sent[0]
    assert event["message_id"] == mid
    assert event["correlation_id"] == "corr-1"
    assert event["to"] == EMAIL["to"]
    assert event["event_id"]
    assert event["occurred_at"]
    assert harness.mailer.sent[0][1] == mid, "the message id is the provider's idempotency key"
    assert harness.dead_letters == []


@pytest.mark.parametrize("broker", BROKERS)
async def test_completion_command_yields_completion_succeeded_and_is_queryable(harness: Harness, broker: str) -> None:
    """A RequestCompletion runs the echo model, publishes `completion.succeeded`, and its result is stored."""
    cmd = completion_cmd()
    mid = await harness.send(broker, names.COMPLETION_QUEUE, cmd)
    done = harness.events(broker, names.COMPLETION_SUCCEEDED)
    assert [e["task_id"] for e in done] == [cmd["task_id"]]
    assert done[0]["message_id"] == mid
    assert done[0]["completion"] == "echo: Say hi"
    task = await harness.store.task(cmd["task_id"])
    assert task is not None
    assert (task.status, task.result) == ("succeeded", "echo: Say hi")


@pytest.mark.parametrize("broker", BROKERS)
async def test_every_outcome_is_appended_to_the_event_log(harness: Harness, broker: str) -> None:
    """The outcome event is in the `events` table under the command's stream, at version 1."""
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL)
    rows = await harness.store.read(stream_id=f"email-{mid}")
    assert [(r.type, r.version) for r in rows] == [(names.EMAIL_SENT, 1)]
    assert rows[0].metadata["message_id"] == mid
    assert rows[0].metadata["source"] == f"{broker}:{names.EMAIL_QUEUE}"


BAD_INPUTS = {
    "not json": b"\x00\x01 this is not json",
    "invalid utf-8": b"\xff\xfe\xfd",
    "json array": b"[1, 2, 3]",
    "json null": b"null",
    "missing fields": b'{"subject": "no recipient"}',
    "wrong types": b'{"to": 42, "subject": ["x"], "body": {"a": 1}}',
    "bad address": b'{"to": "not-an-address", "subject": "s", "body": "b"}',
    "extra field": b'{"to": "a@example.com", "subject": "s", "body": "b", "admin": true}',
    "subject too long": json.dumps({"to": "a@example.com", "subject": "s" * 999, "body": "b"}).encode(),
    "header injection": b'{"to": "a@example.com", "subject": "hi\\r\\nBcc: eve@example.com", "body": "b"}',
    "deeply nested": ("[" * 5000 + "]" * 5000).encode(),
}


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("raw", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
async def test_bad_input_is_dead_lettered_as_invalid_with_bytes_intact(
    harness: Harness, broker: str, raw: bytes
) -> None:
    """Bad input goes once to `<queue>.dlq` as `invalid`, bytes untouched, with `message.dead_lettered`; no mail."""
    mid = await harness.send(broker, names.EMAIL_QUEUE, raw)
    assert len(harness.dead_letters) == 1
    env, headers = harness.dead_letters[0]
    assert env.body == raw
    assert headers[names.H_FAILURE_KIND] == "invalid"
    assert headers[names.H_ORIGINAL_QUEUE] == names.EMAIL_QUEUE
    assert headers[names.H_MESSAGE_ID] == mid
    assert headers[names.H_ATTEMPTS] == "1"
    assert headers[names.H_EXCEPTION_TYPE]
    assert harness.mailer.sent == []
    assert harness.events(broker, names.EMAIL_SENT) == []
    assert harness.events(broker, names.EMAIL_FAILED) == [], "no *.failed for a command that never decoded"
    dead = harness.events(broker, names.MESSAGE_DEAD_LETTERED)
    assert [(d["message_id"], d["failure_kind"]) for d in dead] == [(mid, "invalid")]


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_dead_letter_redelivered_after_parking_is_not_parked_twice(harness: Harness, broker: str) -> None:
    """Parked, then the worker died before the ack: the redelivered copy is acknowledged, not parked again."""
    mid = str(uuid.uuid4())
    await harness.send(broker, names.EMAIL_QUEUE, b"not json", message_id=mid)
    await harness.send(broker, names.EMAIL_QUEUE, b"not json", message_id=mid)  # the same delivery again
    assert len(harness.dead_letters) == 1
    dead = harness.events(broker, names.MESSAGE_DEAD_LETTERED)
    assert [d["message_id"] for d in dead] == [mid]


async def test_rabbit_dead_letter_goes_to_the_dlq_queue_with_the_original_body(harness: Harness) -> None:
    """On RabbitMQ the dead letter is published to queue `email.dlq` with the original bytes."""
    raw = b'{"subject": "no recipient"}'
    await harness.send("rabbit", names.EMAIL_QUEUE, raw)
    dlq = harness.module.publishers.rabbit_dead_letters[names.EMAIL_QUEUE]
    assert dlq.mock.call_count == 1
    assert dlq.mock.call_args.args[0] == json.loads(raw), "the recorder shows the body decoded"


async def test_redis_dead_letter_keeps_the_entry_fields_verbatim(harness: Harness) -> None:
    """On Redis the dead letter is an XADD to `email.dlq` of the entry's own fields plus the failure fields."""
    await harness.send("redis", names.EMAIL_QUEUE, b"\x00garbage")
    [fields] = [f for stream, f in harness.redis_client.added if stream == "email.dlq"]
    assert b"__data__" in fields, "the original FastStream envelope is kept byte for byte"
    assert fields[names.H_FAILURE_KIND.encode()] == b"invalid"


@pytest.mark.parametrize("broker", BROKERS)
async def test_oversized_body_is_dead_lettered_without_decoding(harness: Harness, broker: str) -> None:
    """A body over PIPELINE_MAX_BODY_BYTES is `invalid` before any decoding, and the mailer is never called."""
    limit = harness.module.settings.max_body_bytes
    raw = json.dumps({**EMAIL, "body": "x" * (limit + 10)}).encode()
    await harness.send(broker, names.EMAIL_QUEUE, raw)
    [(env, headers)] = harness.dead_letters
    assert headers[names.H_FAILURE_KIND] == "invalid"
    assert "exceeds" in headers[names.H_EXCEPTION_MESSAGE]
    assert env.body == raw
    assert harness.mailer.sent == []


@pytest.mark.parametrize("broker", BROKERS)
async def test_fatal_handler_error_dead_letters_with_email_failed(harness: Harness, broker: str) -> None:
    """A provider's 4xx is fatal: dead-lettered on the first attempt with `email.failed` and `message.dead_lettered`."""
    harness.mailer.error = DeliveryRejectedError("https://mail/send answered 422: bad template")
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL)
    [(_, headers)] = harness.dead_letters
    assert headers[names.H_FAILURE_KIND] == "fatal"
    assert headers[names.H_EXCEPTION_TYPE] == "handlers.errors.DeliveryRejectedError"
    assert "422" in headers[names.H_EXCEPTION_MESSAGE]
    assert "Traceback" in headers[names.H_EXCEPTION_STACKTRACE]
    failed = harness.events(broker, names.EMAIL_FAILED)
    assert [(f["message_id"], f["failure_kind"]) for f in failed] == [(mid, "fatal")]
    assert len(harness.events(broker, names.MESSAGE_DEAD_LETTERED)) == 1
    assert harness.events(broker, names.EMAIL_SENT) == []
    rows = await harness.store.read(stream_id=f"email-{mid}")
    assert [r.type for r in rows] == [names.EMAIL_FAILED, names.MESSAGE_DEAD_LETTERED]


@pytest.mark.parametrize("broker", BROKERS)
async def test_completion_failure_is_visible_in_the_task_status(harness: Harness, broker: str) -> None:
    """A completion that fails for good leaves its task `failed` with the reason."""

    class BrokenModel:
        async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Any:
            raise DeliveryRejectedError("model not found")

    install(Adapters(mailer=harness.mailer, model=BrokenModel()))
    cmd = completion_cmd()
    await harness.send(broker, names.COMPLETION_QUEUE, cmd)
    task = await harness.store.task(cmd["task_id"])
    assert task is not None
    assert task.status == "failed"
    assert task.reason == "model not found"
    assert len(harness.events(broker, names.COMPLETION_FAILED)) == 1


@pytest.mark.parametrize("broker", BROKERS)
async def test_worker_keeps_consuming_after_bad_input(harness: Harness, broker: str) -> None:
    """After a dead letter the next good message is handled normally."""
    await harness.send(broker, names.EMAIL_QUEUE, b"junk")
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL)
    assert [e["message_id"] for e in harness.events(broker, names.EMAIL_SENT)] == [mid]


@pytest.mark.parametrize("forged", ["-1", "1000000000", "abc", ""])
async def test_forged_attempt_header_is_read_as_first_attempt(harness: Harness, forged: str) -> None:
    """An `x-attempts` header out of range or not a number counts as attempt 1; the message is handled."""
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL, headers={names.H_ATTEMPTS: forged})
    [event] = harness.events("rabbit", names.EMAIL_SENT)
    rows = await harness.store.read(stream_id=f"email-{event['message_id']}")
    assert rows[0].metadata["attempt"] == 1


async def test_message_without_id_gets_a_stable_derived_one(harness: Harness) -> None:
    """A Redis command without any id gets one derived from its bytes: the same bytes, the same id."""
    raw = json.dumps(EMAIL).encode()
    for _ in range(2):
        await harness.module.redis.publish(raw, stream=names.EMAIL_STREAM, correlation_id="")
        await harness.module.pipeline.relay.flush()
    ids = {e["message_id"] for e in harness.events("redis", names.EMAIL_SENT)}
    assert len(ids) == 1


@pytest.mark.parametrize("broker", BROKERS)
async def test_transient_failure_is_handed_back_for_a_delayed_retry(harness: Harness, broker: str) -> None:
    """A 503 schedules attempt 2 through the broker with the backoff delay; nothing is published or parked."""
    harness.mailer.error = DependencyUnavailableError("mail provider answered 503")
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL)
    [(env, delay, headers)] = harness.retries
    policy = harness.module.settings.retry_policy("email")
    assert 0 <= delay <= policy.ceiling(1)
    assert headers[names.H_ATTEMPTS] == "2"
    assert headers[names.H_MESSAGE_ID] == mid
    assert headers[names.H_EXCEPTION_TYPE] == "handlers.errors.DependencyUnavailableError"
    assert env.body == json.dumps(EMAIL).encode()
    assert harness.dead_letters == []
    assert harness.events(broker, names.EMAIL_SENT) == []
    assert harness.events(broker, names.EMAIL_FAILED) == []


@pytest.mark.parametrize("broker", BROKERS)
async def test_last_attempt_failing_is_dead_lettered_as_exhausted(harness: Harness, broker: str) -> None:
    """At the last allowed attempt a transient failure ends in the DLQ as `exhausted`, with `email.failed`."""
    harness.mailer.error = DependencyUnavailableError("mail provider answered 503")
    last = str(harness.module.settings.retry_policy("email").max_attempts)
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL, headers={names.H_ATTEMPTS: last})
    assert harness.retries == []
    [(_, headers)] = harness.dead_letters
    assert headers[names.H_FAILURE_KIND] == "exhausted"
    assert headers[names.H_ATTEMPTS] == last
    assert [e["message_id"] for e in harness.events(broker, names.EMAIL_FAILED)] == [mid]


async def test_redis_retry_is_scheduled_and_acknowledged_in_one_transaction(harness: Harness) -> None:
    """On Redis the retry copy (attempt header updated, body intact) is scheduled in the same MULTI as the XACK."""
    harness.mailer.error = DependencyUnavailableError("timeout")
    await harness.send("redis", names.EMAIL_QUEUE, EMAIL)
    [(key, fields)] = harness.redis_client.scheduled
    assert key.startswith("{email}:retry:")
    from faststream.redis.parser.binary import BinaryMessageFormatV1

    body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
    assert body == json.dumps(EMAIL).encode()
    assert headers[names.H_ATTEMPTS] == "2"


async def test_poison_redelivery_is_dead_lettered_before_handling(harness: Harness) -> None:
    """A redelivered message whose worker died `delivery_limit` times handling it is parked as `poison`, unhandled."""
    limit = harness.module.settings.delivery_limit
    mid = str(uuid.uuid4())
    harness.module.pipeline.crashes.counts[mid] = limit  # its handler died `limit` times
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL, message_id=mid, headers={"x-delivery-count": 1})
    [(_, headers)] = harness.dead_letters
    assert headers[names.H_FAILURE_KIND] == "poison"
    assert f"died {limit} times while handling it" in headers[names.H_EXCEPTION_MESSAGE]
    assert harness.mailer.sent == []
    assert [e["message_id"] for e in harness.events("rabbit", names.MESSAGE_DEAD_LETTERED)] == [mid]


async def test_redelivered_neighbour_of_a_crash_is_handled_not_parked(harness: Harness) -> None:
    """A message the broker charged with many deliveries but that never crashed its worker is handled once."""
    mid = str(uuid.uuid4())
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL, message_id=mid, headers={"x-delivery-count": 15})
    assert harness.dead_letters == []
    assert len(harness.mailer.sent) == 1
    ledger = harness.module.pipeline.crashes
    assert ledger.runs == [mid]
    assert ledger.counts == {mid: 0}, "it never crashed: not a suspect, handled beside the others"


async def test_every_handler_run_is_counted_and_uncounted(harness: Harness) -> None:
    """A first delivery's run is counted while its handler runs, and the count is back at zero after."""
    mid = await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL)
    assert len(harness.mailer.sent) == 1
    assert harness.module.pipeline.crashes.runs == [mid]
    assert harness.module.pipeline.crashes.counts == {mid: 0}


async def test_a_suspect_runs_alone(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A redelivered message whose worker died inside its handler before runs with nothing beside it."""
    pipeline = harness.module.pipeline
    mid = str(uuid.uuid4())
    pipeline.crashes.counts[mid] = 1
    seen: list[int] = []
    original = pipeline.isolation.exclusive

    def spy() -> Any:
        seen.append(pipeline.isolation.exclusive_waiting)
        return original()

    monkeypatch.setattr(pipeline.isolation, "exclusive", spy)
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL, message_id=mid, headers={"x-delivery-count": 1})
    assert seen == [0], "it went through the exclusive side"
    assert len(harness.mailer.sent) == 1
    assert harness.dead_letters == []


async def test_without_a_ledger_the_broker_count_decides(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """No crash ledger (Redis unreachable): `x-delivery-count` at the limit makes the message poison."""
    monkeypatch.setattr(harness.module.pipeline, "crashes", None)
    limit = harness.module.settings.delivery_limit
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL, headers={"x-delivery-count": limit})
    [(_, headers)] = harness.dead_letters
    assert headers[names.H_FAILURE_KIND] == "poison"
    assert harness.mailer.sent == []


# ---- pushback: the provider says "later" ----------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
async def test_throttled_message_waits_on_the_broker_with_its_attempt_unused(harness: Harness, broker: str) -> None:
    """A 429 with Retry-After: 7 hands the message back for at least 7 s as the same attempt; nothing is parked."""
    harness.mailer.error = ThrottledError("mail provider answered 429", retry_after=7.0)
    mid = await harness.send(broker, names.EMAIL_QUEUE, EMAIL, headers={names.H_ATTEMPTS: "3"})
    [(env, delay, headers)] = harness.retries
    assert 7.0 <= delay <= 8.0
    assert headers[names.H_ATTEMPTS] == "3"  # the attempt it was: throttling uses none
    assert headers[names.H_MESSAGE_ID] == mid
    assert headers[names.H_EXCEPTION_TYPE] == "handlers.errors.ThrottledError"
    assert env.body == json.dumps(EMAIL).encode()
    assert harness.dead_letters == []
    assert harness.events(broker, names.EMAIL_FAILED) == []


async def test_throttling_at_the_last_attempt_does_not_dead_letter(harness: Harness) -> None:
    """A message on its last attempt that is throttled waits again: only failures use attempts."""
    harness.mailer.error = ThrottledError("429", retry_after=1.0)
    last = str(harness.module.settings.retry_policy("email").max_attempts)
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL, headers={names.H_ATTEMPTS: last})
    [(_, _, headers)] = harness.retries
    assert headers[names.H_ATTEMPTS] == last
    assert harness.dead_letters == []


async def test_throttling_dead_letters_only_past_the_maximum_age(harness: Harness) -> None:
    """A message first pushed back longer ago than PIPELINE_RETRY_MAX_AGE is dead-lettered as exhausted."""
    harness.mailer.error = ThrottledError("429", retry_after=1.0)
    max_age = harness.module.settings.retry_policy("email").max_age
    first = (datetime.now(UTC) - timedelta(seconds=max_age)).isoformat()
    mid = await harness.send("redis", names.EMAIL_STREAM, EMAIL, headers={names.H_FIRST_FAILURE_AT: first})
    assert harness.retries == []
    [(_, headers)] = harness.dead_letters
    assert headers[names.H_FAILURE_KIND] == "exhausted"
    assert [e["message_id"] for e in harness.events("redis", names.EMAIL_FAILED)] == [mid]


async def test_throttling_never_opens_the_breaker(harness: Harness) -> None:
    """Twice the breaker's threshold of 429s leaves it closed: the provider is up, only busy."""
    harness.mailer.error = ThrottledError("429", retry_after=0.0)
    threshold = harness.module.settings.breaker_threshold
    for _ in range(2 * threshold):
        await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL)
    assert len(harness.retries) == 2 * threshold
    assert harness.module.pipeline.breaker("mailer").state is State.CLOSED
    # An outage still opens it.
    harness.mailer.error = DependencyUnavailableError("503")
    for _ in range(threshold):
        await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL)
    assert harness.module.pipeline.breaker("mailer").state is State.OPEN


async def test_after_pushback_the_next_message_waits_on_the_broker_without_calling(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the provider asked for 30 s, the next e-mail is not sent: it waits on the broker, attempt unused."""
    monkeypatch.setattr(harness.module.pipeline, "limiter", Limiter(None, {}, max_wait=1.0))
    harness.mailer.error = ThrottledError("429", retry_after=30.0)
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL)
    harness.mailer.error = None
    await harness.send("rabbit", names.EMAIL_QUEUE, EMAIL)
    assert harness.mailer.sent == []
    [_, (_, delay, headers)] = harness.retries
    assert 28.0 <= delay <= 31.0
    assert headers[names.H_ATTEMPTS] == "1"
    assert "at its limit" in headers[names.H_EXCEPTION_MESSAGE]
    assert harness.dead_letters == []
