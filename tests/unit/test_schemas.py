"""Commands validate and freeze; events carry the contract's common fields and round-trip as JSON."""

from __future__ import annotations

import time
import typing
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import (
    CompletionFailed,
    CompletionRequested,
    CompletionSucceeded,
    EmailFailed,
    EmailSent,
    Event,
    FailureKind,
    MessageDeadLettered,
    OutcomeEvent,
    RequestCompletion,
    RetryScheduled,
    SendEmail,
)
from schemas.commands import MAX_BODY_CHARS, MAX_PROMPT_CHARS

GOOD_MAIL: dict[str, Any] = {"to": "ada@example.com", "subject": "Welcome", "body": "Hello Ada."}
GOOD_COMPLETION: dict[str, Any] = {"task_id": "task-1", "prompt": "Summarise this.", "model": "echo"}
IDS: dict[str, Any] = {"message_id": "msg-1", "correlation_id": "corr-1"}

# One valid instance of every outcome event, built from its own fields plus the common ids.
BUILT_AT = datetime.now(UTC)
EVENT_SAMPLES: list[Event] = [
    EmailSent(**IDS, to="ada@example.com", subject="Welcome", provider_id="prov-1"),
    EmailFailed(**IDS, to="ada@example.com", reason="550 mailbox unavailable", failure_kind=FailureKind.FATAL),
    CompletionSucceeded(
        **IDS, task_id="t-1", model="echo", completion="echo: hi", prompt_tokens=1, completion_tokens=2
    ),
    CompletionFailed(**IDS, task_id="t-1", model="gpt", reason="quota", failure_kind=FailureKind.EXHAUSTED),
    MessageDeadLettered(
        **IDS,
        queue="email",
        dead_letter_queue="email.dlq",
        failure_kind=FailureKind.POISON,
        exception_type="RuntimeError",
        exception_message="worker died",
        attempts=3,
    ),
    CompletionRequested(**IDS, task_id="t-1", model="echo"),
    RetryScheduled(
        **IDS, queue="email", attempt=1, delay_seconds=1.0, exception_type="TimeoutError", exception_message="slow"
    ),
]
EVENT_IDS = [type(event).__name__ for event in EVENT_SAMPLES]


# -- SendEmail -----------------------------------------------------------------------------


def test_send_email_accepts_a_valid_command_with_and_without_template() -> None:
    """A well-formed SendEmail validates; `template` is optional and defaults to None."""
    assert SendEmail(**GOOD_MAIL).template is None
    assert SendEmail(**GOOD_MAIL, template="welcome.v2").template == "welcome.v2"


def test_send_email_accepts_limits_exactly() -> None:
    """A 998-char subject and a body of exactly MAX_BODY_CHARS are still valid."""
    mail = SendEmail(**{**GOOD_MAIL, "subject": "s" * 998, "body": "b" * MAX_BODY_CHARS})

    assert len(mail.subject) == 998
    assert len(mail.body) == MAX_BODY_CHARS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "not-an-address"),
        ("to", "ada@"),
        ("to", "@example.com"),
        ("to", ""),
        ("to", None),
        ("subject", ""),
        ("subject", "s" * 999),
        ("subject", None),
        ("subject", "Hi\r\nBcc: eve@example.com"),
        ("subject", "Hi\n"),
        ("body", "b" * (MAX_BODY_CHARS + 1)),
        ("body", None),
        ("template", "Welcome"),
        ("template", "_welcome"),
        ("template", "welcome mail"),
        ("template", "../etc/passwd"),
        ("template", ""),
        ("template", "t" * 65),
        ("template", "welcome\n"),
    ],
    ids=[
        "to-no-at",
        "to-no-domain",
        "to-no-local-part",
        "to-empty",
        "to-null",
        "subject-empty",
        "subject-999-chars",
        "subject-null",
        "subject-header-injection",
        "subject-trailing-newline",
        "body-oversized",
        "body-null",
        "template-uppercase",
        "template-leading-underscore",
        "template-space",
        "template-path",
        "template-empty",
        "template-too-long",
        "template-trailing-newline",
    ],
)
def test_send_email_rejects_invalid_field(field: str, value: Any) -> None:
    """Each invalid field value makes SendEmail raise ValidationError naming that field."""
    with pytest.raises(ValidationError) as info:
        SendEmail(**{**GOOD_MAIL, field: value})

    assert {error["loc"][0] for error in info.value.errors()} == {field}


@pytest.mark.parametrize("missing", ["to", "subject", "body"])
def test_send_email_requires_to_subject_and_body(missing: str) -> None:
    """`to`, `subject` and `body` are required."""
    with pytest.raises(ValidationError, match=missing):
        SendEmail(**{k: v for k, v in GOOD_MAIL.items() if k != missing})


def test_send_email_rejects_extra_fields() -> None:
    """Unknown fields are refused rather than silently dropped."""
    with pytest.raises(ValidationError, match="extra_forbidden"):
        SendEmail.model_validate({**GOOD_MAIL, "cc": "bob@example.com"})


def test_send_email_is_frozen() -> None:
    """A validated command cannot be mutated."""
    mail = SendEmail(**GOOD_MAIL)

    with pytest.raises(ValidationError, match="frozen"):
        mail.subject = "changed"  # type: ignore[misc]


def test_send_email_validates_from_json() -> None:
    """A JSON body as producers send it validates into SendEmail."""
    mail = SendEmail.model_validate_json(
        '{"to": "ada@example.com", "subject": "Hi", "body": "x", "template": "welcome"}'
    )

    assert str(mail.to) == "ada@example.com"
    assert mail.template == "welcome"


# -- RequestCompletion ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["echo", "gpt-4o-mini", "llama3:8b", "meta-llama/Llama-3.1-8B", "m" * 128])
def test_request_completion_accepts_valid_model_names(model: str) -> None:
    """Model names with dots, colons, slashes and dashes up to 128 chars are accepted."""
    assert RequestCompletion(**{**GOOD_COMPLETION, "model": model}).model == model


def test_request_completion_accepts_limits_exactly() -> None:
    """A prompt of exactly MAX_PROMPT_CHARS and a 128-char task id are still valid."""
    cmd = RequestCompletion(**{**GOOD_COMPLETION, "prompt": "p" * MAX_PROMPT_CHARS, "task_id": "t" * 128})

    assert len(cmd.prompt) == MAX_PROMPT_CHARS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", ""),
        ("model", "-leading-dash"),
        ("model", "has space"),
        ("model", "semi;colon"),
        ("model", "m" * 129),
        ("model", "echo\n"),
        ("prompt", ""),
        ("prompt", "p" * (MAX_PROMPT_CHARS + 1)),
        ("task_id", ""),
        ("task_id", "has space"),
        ("task_id", "slash/not/allowed"),
        ("task_id", "t" * 129),
        ("task_id", 42),
        ("task_id", "t-1\n"),
    ],
    ids=[
        "model-empty",
        "model-leading-dash",
        "model-space",
        "model-semicolon",
        "model-too-long",
        "model-trailing-newline",
        "prompt-empty",
        "prompt-oversized",
        "task-empty",
        "task-space",
        "task-slash",
        "task-too-long",
        "task-not-string",
        "task-trailing-newline",
    ],
)
def test_request_completion_rejects_invalid_field(field: str, value: Any) -> None:
    """Each invalid field value makes RequestCompletion raise ValidationError naming that field."""
    with pytest.raises(ValidationError) as info:
        RequestCompletion(**{**GOOD_COMPLETION, field: value})

    assert {error["loc"][0] for error in info.value.errors()} == {field}


def test_request_completion_rejects_extra_fields_and_is_frozen() -> None:
    """RequestCompletion refuses unknown fields and cannot be mutated."""
    with pytest.raises(ValidationError, match="extra_forbidden"):
        RequestCompletion.model_validate({**GOOD_COMPLETION, "temperature": 0.2})
    cmd = RequestCompletion(**GOOD_COMPLETION)
    with pytest.raises(ValidationError, match="frozen"):
        cmd.prompt = "other"  # type: ignore[misc]


# -- Events --------------------------------------------------------------------------------


def _contract_events() -> set[type[Event]]:
    """The Event classes of the `schemas` package (a test may declare a flow with events of its own)."""
    return {cls for cls in Event.__subclasses__() if cls.__module__.startswith("schemas.")}


def test_event_samples_cover_every_event_class() -> None:
    """Every concrete Event subclass has a sample here, so new events cannot skip these checks."""
    assert {type(event) for event in EVENT_SAMPLES} == _contract_events()


@pytest.mark.parametrize("event", EVENT_SAMPLES, ids=EVENT_IDS)
def test_event_has_common_fields_and_type_equal_to_class_type(event: Event) -> None:
    """Every event has event_id, occurred_at (UTC, now), message_id, correlation_id and `type` == TYPE."""
    data = event.model_dump(mode="json")

    assert {"event_id", "occurred_at", "message_id", "correlation_id", "type"} <= data.keys()
    assert data["type"] == type(event).TYPE != ""
    assert event.message_id == "msg-1"
    assert event.correlation_id == "corr-1"
    assert event.event_id
    assert event.occurred_at.tzinfo is not None
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert BUILT_AT <= event.occurred_at <= datetime.now(UTC), "stamped when built, in UTC"


def test_event_types_are_the_contract_names() -> None:
    """The published routing keys / event types are exactly the ones the contract fixes."""
    published = typing.get_args(OutcomeEvent)
    stored_only = {CompletionRequested, RetryScheduled}
    assert _contract_events() == set(published) | stored_only
    assert sorted(cls.TYPE for cls in published) == [
        "completion.failed",
        "completion.succeeded",
        "email.failed",
        "email.sent",
        "message.dead_lettered",
    ]


@pytest.mark.parametrize("event", EVENT_SAMPLES, ids=EVENT_IDS)
def test_event_rejects_another_events_type(event: Event) -> None:
    """An event cannot be built with a `type` other than its own."""
    data = event.model_dump()
    data["type"] = "email.sent" if type(event) is not EmailSent else "email.failed"

    with pytest.raises(ValidationError):
        type(event).model_validate(data)


@pytest.mark.parametrize("event", EVENT_SAMPLES, ids=EVENT_IDS)
def test_event_ids_are_unique(event: Event) -> None:
    """Two events built from the same fields still get different event ids."""
    cls = type(event)
    fields = event.model_dump(exclude={"event_id", "occurred_at"})
    ids = {cls(**fields).event_id for _ in range(100)}

    assert len(ids) == 100
    assert event.event_id not in ids


@pytest.mark.parametrize("event", EVENT_SAMPLES, ids=EVENT_IDS)
def test_event_json_round_trip(event: Event) -> None:
    """Serialising an event to JSON and parsing it back gives an equal event."""
    again = type(event).model_validate_json(event.model_dump_json())

    assert again == event
    assert again.occurred_at == event.occurred_at


@pytest.mark.parametrize("event", EVENT_SAMPLES, ids=EVENT_IDS)
def test_event_is_frozen_and_closed(event: Event) -> None:
    """Events cannot be mutated and refuse unknown fields."""
    with pytest.raises(ValidationError, match="frozen"):
        event.message_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra_forbidden"):
        type(event).model_validate({**event.model_dump(), "surprise": 1})


@pytest.mark.parametrize("missing", ["message_id", "correlation_id"])
def test_event_requires_message_and_correlation_id(missing: str) -> None:
    """An event cannot be built without the ids of the command it answers."""
    fields = {"to": "ada@example.com", "subject": "s", **IDS}
    del fields[missing]

    with pytest.raises(ValidationError, match=missing):
        EmailSent(**fields)


def test_failure_kind_values_are_the_contract_header_values() -> None:
    """FailureKind serialises to the `x-failure-kind` values of the contract."""
    assert {kind.value for kind in FailureKind} == {"invalid", "exhausted", "fatal", "poison"}
    assert (
        EmailFailed(**IDS, to="a@b.c", reason="r", failure_kind=FailureKind.FATAL).model_dump(mode="json")[
            "failure_kind"
        ]
        == "fatal"
    )


def test_event_ids_are_uuid7_and_sort_in_the_order_they_were_made() -> None:
    """Every event id is a UUIDv7 (RFC 9562 version and variant bits), unique, and ids made a
    millisecond or more apart sort as they were made (the store's event-id indexes grow at their end)."""
    made: list[str] = []
    for _ in range(3):
        made.append(EmailSent(message_id="m", correlation_id="c", to="a@example.com", subject="s").event_id)
        stamp = time.time_ns()
        while time.time_ns() - stamp < 1_500_000:  # into the next millisecond
            pass
    batch = [
        EmailSent(message_id="m", correlation_id="c", to="a@example.com", subject="s").event_id for _ in range(10_000)
    ]
    for value in made + batch:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == value
    assert made == sorted(made)
    assert len(set(batch)) == len(batch)
    assert abs(int(made[-1][:8] + made[-1][9:13], 16) - time.time_ns() // 1_000_000) < 60_000, "Unix milliseconds"
