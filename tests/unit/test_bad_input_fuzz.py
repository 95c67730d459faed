"""Bad input, property-based (hypothesis), against every queue and stream of the app in memory.

For each generated input on each of `email` / `ai.completion` on RabbitMQ and Redis: the
message is dead-lettered exactly once as `invalid`, its bytes intact, with the failure headers;
nothing is sent and no success is published; nothing escapes the subscriber (the worker does
not crash); and a valid command published right after is still handled. Inputs: random bytes,
invalid UTF-8, JSON of the wrong shape and of the wrong types, deeply nested JSON, bodies over
PIPELINE_MAX_BODY_BYTES, wrong content types, missing and forged headers (x-attempts -1, 10**9,
junk; a forged message id), and unicode edge cases.

Hypothesis does not run async tests itself: each test keeps one event loop (`asyncio.Runner`)
with the app's brokers under TestRabbitBroker / TestRedisBroker open for all its examples.
`FUZZ_EXAMPLES` (default 40) sets the examples per queue; `FUZZ_SEED` fixes the seed (default 0,
so CI is reproducible).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from faststream.rabbit import TestRabbitBroker
from faststream.redis import TestRedisBroker
from faststream.redis.parser.binary import BinaryMessageFormatV1
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from handlers.models import EchoModel
from schemas import RequestCompletion, SendEmail
from streams.core import names
from streams.core.envelope import Envelope
from streams.eventstore.tables import dead_letters
from streams.flows.deps import Adapters, install
from streams.transport import topology
from tests.conftest import CountingLedger, RecordingRedis
from tests.unit.test_pipeline import FakeMailer

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
COMMANDS: dict[str, type[BaseModel]] = {names.EMAIL_QUEUE: SendEmail, names.COMPLETION_QUEUE: RequestCompletion}
TARGETS = [(b, q) for b in ("rabbit", "redis") for q in (names.EMAIL_QUEUE, names.COMPLETION_QUEUE)]
SUCCESS = {names.EMAIL_QUEUE: names.EMAIL_SENT, names.COMPLETION_QUEUE: names.COMPLETION_SUCCEEDED}

# Unicode that breaks naive code: NUL, BOM, bidi overrides, zero-width, combining marks, astral
# characters, lone surrogates (only as \\u escapes: they cannot be UTF-8), confusables, CR/LF.
UNICODE_EDGES = [
    "\x00",
    "\ufeff",
    "\u202e",
    "\u200b\u200d",
    "e\u0301\u0301\u0301",
    "\U0001f4a9",
    "\U0010ffff",
    "\\ud800",
    "\\udfff\\ud800",
    "\u0430da@example.com",  # Cyrillic a
    "ada@ex\u0430mple.com",
    "a\r\nBcc: eve@example.com",
    "\u2028\u2029",
    "\uffff\ufffe",
    "Z\u0351\u0352\u0353\u0354" * 50,
]
FORGED_ATTEMPTS = ["-1", str(10**9), "abc", "", "1e3", "0x10", "0", "1001", "-0x7fffffff"]
CONTENT_TYPES = [
    "text/plain",
    "application/xml",
    "application/octet-stream",
    "image/png",
    "application/json; charset=latin-1",
    "multipart/form-data; boundary=x",
    "",
    "\u202eapplication/json",
]


def is_valid(queue: str, raw: bytes) -> bool:
    """What the schema alone says of these bytes (the oracle that keeps the generators honest)."""
    try:
        COMMANDS[queue].model_validate_json(raw)
    except (ValidationError, ValueError, RecursionError):
        return False
    return True


def valid_body(queue: str) -> bytes:
    if queue == names.EMAIL_QUEUE:
        return json.dumps({"to": "ada@example.com", "subject": "Welcome", "body": "Hello Ada"}).encode()
    return json.dumps({"task_id": f"t-{uuid.uuid4()}", "prompt": "Say hi", "model": "echo"}).encode()


# --- strategies ---------------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    prefix = draw(st.text(max_size=20)).encode()
    bad = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
    return b'{"to": "' + prefix + bad + b'@example.com", "subject": "s", "body": "b"}'


@st.composite
def wrong_types(draw: st.DrawFn, queue: str) -> bytes:
    keys = ["to", "subject", "body", "template"] if queue == names.EMAIL_QUEUE else ["task_id", "prompt", "model"]
    data = {k: draw(json_any) for k in keys if draw(st.booleans())}
    if draw(st.booleans()):
        data[draw(st.text(max_size=8))] = draw(json_any)  # an unknown field
    return json.dumps(data).encode()


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(min_value=200, max_value=20_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return (opener * depth + "1" + closer * depth).encode()


@st.composite
def unicode_edges(draw: st.DrawFn, queue: str) -> bytes:
    edge = draw(st.sampled_from(UNICODE_EDGES))
    keys = ["to", "subject", "body"] if queue == names.EMAIL_QUEUE else ["task_id", "prompt", "model"]
    data: dict[str, Any] = json.loads(valid_body(queue))
    data[draw(st.sampled_from(keys))] = draw(st.sampled_from([edge, edge * 3, "x" + edge + "y"]))
    text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    if edge.startswith("\\u"):  # a lone surrogate, written as the JSON escape
        text = text.replace("\\\\u", "\\u")
    return text.encode("utf-8", "surrogatepass")


def bodies(queue: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        invalid_utf8(),
        json_any.map(lambda v: json.dumps(v).encode()),
        wrong_types(queue),
        deeply_nested(),
        unicode_edges(queue),
    ).filter(lambda raw: not is_valid(queue, raw))


@dataclass(frozen=True)
class Case:
    """One bad message: its bytes and how it travels."""

    body: bytes
    content_type: str | None = "application/json"
    attempts: str | None = None
    message_id: str | None = None  # None: none at all (derived by the pipeline)
    forged_header_id: str | None = None  # a `message-id` header that disagrees with the property


@st.composite
def cases(draw: st.DrawFn, queue: str, broker: str = "rabbit") -> Case:
    body = draw(bodies(queue))
    if broker == "redis" and not body:
        # In memory only: TestRedisBroker keys its fake pending list by the parsed message's
        # correlation id, which the pipeline's tolerant parser replaces for an empty body, so the
        # fake loses the entry (KeyError). Real Redis acks by entry id; the chaos tier sends b"".
        body = b" "
    # Redis header values stay ASCII here: see test_redis_header_values_beyond_ascii_survive.
    header_text = st.text(min_size=1, max_size=40)
    ids = st.text(min_size=1, max_size=300)
    if broker == "redis":
        header_text = st.text(st.characters(max_codepoint=127), min_size=1, max_size=40)
        ids = st.text(st.characters(max_codepoint=127), min_size=1, max_size=300)
    return Case(
        body=body,
        content_type=draw(st.sampled_from(["application/json", None, *CONTENT_TYPES[:-1]])),
        attempts=draw(st.none() | st.sampled_from(FORGED_ATTEMPTS)),
        message_id=draw(st.none() | st.uuids().map(str) | ids),
        forged_header_id=draw(st.none() | header_text),
    )


# --- the app in memory, for all examples of one test ---------------------------------------------


@dataclass
class Session:
    """The app under TestRabbitBroker/TestRedisBroker on one loop, with recording fakes."""

    module: Any
    mailer: FakeMailer
    redis_client: RecordingRedis
    dead_letters: list[tuple[Envelope, dict[str, str]]] = field(default_factory=list)

    async def parked_before(self, broker: str, queue: str, body: bytes) -> bool:
        """An earlier message with these bytes was dead-lettered from this queue (kept in the store)."""
        async with self.module.store.engine.connect() as conn:
            found = await conn.execute(
                select(dead_letters.c.id).where(
                    dead_letters.c.transport == broker, dead_letters.c.queue == queue, dead_letters.c.body == body
                )
            )
            return found.first() is not None

    def success_ids(self, broker: str, queue: str) -> list[str]:
        """Message ids answered by a success event on `events` of one broker."""
        pubs = self.module.publishers
        if broker == "rabbit":
            calls = pubs.rabbit_events[SUCCESS[queue]].mock.call_args_list
            return [c.args[0]["message_id"] for c in calls]
        found = []
        # The relay XADDs to stream `events` through the (here: recording) client.
        for stream, fields in self.redis_client.added:
            if stream == names.EVENTS_STREAM:
                body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
                if headers.get(names.H_EVENT_TYPE) == SUCCESS[queue]:
                    found.append(json.loads(body)["message_id"])
        return found

    async def send(self, broker: str, queue: str, case: Case) -> None:
        props: dict[str, Any] = {}
        if case.content_type is not None:
            props["content_type"] = case.content_type
        headers: dict[str, str] = {}
        if case.attempts is not None:
            headers[names.H_ATTEMPTS] = case.attempts
        if case.forged_header_id is not None:
            headers[names.H_MESSAGE_ID] = case.forged_header_id
        if broker == "rabbit":
            await self.module.rabbit.publish(
                case.body,
                exchange=topology.TASKS,
                routing_key=queue,
                message_id=case.message_id,
                headers=headers,
                **props,
            )
        else:
            if case.message_id is not None:
                headers[names.H_MESSAGE_ID] = case.message_id
            if case.content_type is not None:
                headers["content-type"] = case.content_type
            # TestRedisBroker keys its fake pending list by correlation id: always give one.
            correlation_id = case.message_id or str(uuid.uuid4())
            await self.module.redis.publish(case.body, stream=queue, headers=headers, correlation_id=correlation_id)
        await self.module.pipeline.relay.flush()


@contextlib.contextmanager
def app_session(runner: asyncio.Runner) -> Iterator[Session]:
    from streams import app as module

    mailer = FakeMailer()
    fake_redis = RecordingRedis()
    session = Session(module, mailer, fake_redis)
    with pytest.MonkeyPatch.context() as mp:
        runner.run(module.store.start())
        module.pipeline.breakers.clear()
        install(Adapters(mailer=mailer, model=EchoModel()))
        mp.setattr(module.redis_outlet, "client", fake_redis)
        mp.setattr(module.pipeline, "crashes", CountingLedger())
        for outlet in (module.rabbit_outlet, module.redis_outlet):
            original = outlet.dead_letter

            async def spy(env: Envelope, headers: dict[str, str], _orig: Any = original) -> None:
                session.dead_letters.append((env, headers))
                # TestRabbitBroker's recorder would JSON-decode the garbage; the real publish is
                # exercised by the connected and chaos tiers.
                if env.transport == "redis":
                    await _orig(env, headers)

            mp.setattr(outlet, "dead_letter", spy)
        stack = contextlib.AsyncExitStack()

        async def enter() -> None:
            await stack.enter_async_context(TestRabbitBroker(module.rabbit))
            await stack.enter_async_context(TestRedisBroker(module.redis))

        runner.run(enter())
        try:
            yield session
        finally:
            runner.run(stack.aclose())
            install(Adapters())


async def check_case(s: Session, broker: str, queue: str, case: Case) -> dict[str, str]:
    """Send one bad message, check where it landed, then check a good one is still handled."""
    s.dead_letters.clear()
    sent_before = len(s.mailer.sent)
    await s.send(broker, queue, case)  # raises if anything escaped the subscriber
    if not s.dead_letters and await s.parked_before(broker, queue, case.body):
        # Hypothesis sent the very same message (id and bytes) again: a redelivery of a message
        # already parked is acknowledged, not parked twice (its first copy is in the DLQ).
        return {}
    assert len(s.dead_letters) == 1, f"dead-lettered once, got {len(s.dead_letters)}"
    env, headers = s.dead_letters[0]
    assert headers[names.H_FAILURE_KIND] == "invalid", headers
    assert env.body == case.body, "bytes intact"
    assert headers[names.H_ORIGINAL_QUEUE] == queue
    assert headers[names.H_ATTEMPTS] == "1", "a forged attempt header never counts"
    for key in (names.H_EXCEPTION_TYPE, names.H_EXCEPTION_MESSAGE, names.H_MESSAGE_ID, names.H_CORRELATION_ID):
        assert headers[key], key
    assert len(headers[names.H_MESSAGE_ID]) <= 256
    if broker == "rabbit" and case.message_id:
        assert headers[names.H_MESSAGE_ID] == case.message_id[:256], "the broker's message id wins over a header"
    assert len(s.mailer.sent) == sent_before, "nothing sent for bad input"
    assert env.message_id not in s.success_ids(broker, queue)
    # The next valid message is still handled.
    s.dead_letters.clear()
    good = Case(valid_body(queue), message_id=str(uuid.uuid4()))
    await s.send(broker, queue, good)
    assert s.dead_letters == [], [h for _, h in s.dead_letters]
    assert good.message_id in s.success_ids(broker, queue), "a valid message right after is handled"
    return headers


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        database=None,
    )


@pytest.mark.parametrize(("broker", "queue"), TARGETS)
def test_bad_input_lands_in_the_dlq_as_invalid_and_the_worker_goes_on(broker: str, queue: str) -> None:
    with asyncio.Runner() as runner, app_session(runner) as s:

        @seed(SEED)
        @_settings(EXAMPLES)
        @given(case=cases(queue, broker))
        def check(case: Case) -> None:
            runner.run(check_case(s, broker, queue, case))

        check()


@pytest.mark.parametrize(("broker", "queue"), TARGETS)
def test_oversize_body_is_invalid_before_decoding(broker: str, queue: str) -> None:
    """Over PIPELINE_MAX_BODY_BYTES, even a valid command is dead-lettered, undecoded."""
    with asyncio.Runner() as runner, app_session(runner) as s:
        limit = s.module.settings.max_body_bytes

        @seed(SEED)
        @_settings(4)
        @given(extra=st.integers(min_value=1, max_value=4096), valid=st.booleans())
        def check(extra: int, valid: bool) -> None:
            data: dict[str, Any] = json.loads(valid_body(queue))
            key = "body" if queue == names.EMAIL_QUEUE else "prompt"
            raw = json.dumps({**data, key: ""}).encode()
            data[key] = "x" * (limit - len(raw) + extra)
            body = json.dumps(data).encode() if valid else b"\x00" * (limit + extra)
            headers = runner.run(check_case(s, broker, queue, Case(body, message_id=str(uuid.uuid4()))))
            assert "exceeds" in headers[names.H_EXCEPTION_MESSAGE]

        check()


@pytest.mark.parametrize(("broker", "queue"), TARGETS)
@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_valid_json_under_a_wrong_content_type_is_handled_or_invalid_never_lost(
    broker: str, queue: str, content_type: str
) -> None:
    """A valid body labelled e.g. text/plain: handled once or dead-lettered as invalid, never both or neither."""
    with asyncio.Runner() as runner, app_session(runner) as s:
        mid = str(uuid.uuid4())
        case = Case(valid_body(queue), content_type=content_type, message_id=mid)
        runner.run(s.send(broker, queue, case))
        handled = s.success_ids(broker, queue).count(mid)
        parked = [h for _, h in s.dead_letters]
        assert (handled, len(parked)) in {(1, 0), (0, 1)}, (handled, parked)
        if parked:
            assert parked[0][names.H_FAILURE_KIND] == "invalid"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "FastStream 0.7.8 BinaryMessageFormatV1.encode writes a header value's length in characters, "
        "not bytes: a non-ASCII header value (message id, content type, x-exception-message) corrupts "
        "the envelope, which parse() then reads as one opaque body without headers"
    ),
)
@pytest.mark.parametrize("value", ["\u00e9", "\x80", "\U0001f4a9"])
def test_redis_header_values_beyond_ascii_survive(value: str) -> None:
    """A Redis command whose message-id header is not ASCII keeps its id and body (or is parked intact)."""
    with asyncio.Runner() as runner, app_session(runner) as s:
        case = Case(valid_body(names.EMAIL_QUEUE), message_id=f"id-{value}")
        runner.run(s.send("redis", names.EMAIL_QUEUE, case))
        assert case.message_id in s.success_ids("redis", names.EMAIL_QUEUE)
