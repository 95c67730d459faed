"""send_email and complete with in-process fakes: ids flow from the context, port errors pass through."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from handlers.completion import complete
from handlers.email import send_email
from handlers.errors import (
    DeliveryRejectedError,
    DependencyUnavailableError,
    InvalidMessageError,
)
from handlers.mailers import LogMailer
from handlers.models import EchoModel
from handlers.ports import Completion, CompletionModel, Mailer
from schemas import CompletionSucceeded, EmailSent, MessageContext, RequestCompletion, SendEmail

CTX = MessageContext(message_id="msg-123", correlation_id="corr-456", attempt=2)
MAIL = SendEmail(to="ada@example.com", subject="Welcome", body="Hello Ada.", template="welcome")
ASK = RequestCompletion(task_id="task-9", prompt="say hello world", model="echo")


@dataclass
class RecordingMailer:
    """A Mailer that records each call and answers with `provider_id`, or raises `error`."""

    provider_id: str | None = "prov-1"
    error: Exception | None = None
    calls: list[tuple[SendEmail, str]] = field(default_factory=list)

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str | None:
        self.calls.append((mail, idempotency_key))
        if self.error is not None:
            raise self.error
        return self.provider_id


@dataclass
class RecordingModel:
    """A CompletionModel that records each call and delegates to EchoModel, or raises `error`."""

    error: Exception | None = None
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Completion:
        self.calls.append((prompt, model, idempotency_key))
        if self.error is not None:
            raise self.error
        return await EchoModel().complete(prompt, model=model, idempotency_key=idempotency_key)


PORT_ERRORS = [
    DeliveryRejectedError("422 unknown template"),
    DependencyUnavailableError("503 try later"),
    InvalidMessageError("bad"),
    RuntimeError("a bug in the adapter"),
]
PORT_ERROR_IDS = [type(error).__name__ for error in PORT_ERRORS]


def test_fakes_satisfy_the_ports() -> None:
    """The fakes and the built-in adapters type-check and run as the handlers' Protocols."""
    mailers: list[Mailer] = [RecordingMailer(), LogMailer()]
    models: list[CompletionModel] = [RecordingModel(), EchoModel()]

    assert len(mailers) == len(models) == 2


# -- send_email ----------------------------------------------------------------------------


async def test_send_email_returns_email_sent_with_context_ids() -> None:
    """The EmailSent event answers the command: message_id and correlation_id come from the context."""
    event = await send_email(MAIL, CTX, RecordingMailer(provider_id="prov-77"))

    assert isinstance(event, EmailSent)
    assert event.type == EmailSent.TYPE == "email.sent"
    assert event.message_id == "msg-123"
    assert event.correlation_id == "corr-456"
    assert event.to == "ada@example.com"
    assert event.subject == "Welcome"
    assert event.provider_id == "prov-77"


async def test_send_email_uses_message_id_as_idempotency_key_and_sends_once() -> None:
    """The mailer is called exactly once, with the command unchanged and idempotency_key = message id."""
    mailer = RecordingMailer()

    await send_email(MAIL, CTX, mailer)

    assert mailer.calls == [(MAIL, "msg-123")]


async def test_send_email_accepts_a_mailer_without_provider_id() -> None:
    """A mailer that returns no id still yields EmailSent, with provider_id None."""
    event = await send_email(MAIL, CTX, RecordingMailer(provider_id=None))

    assert event.provider_id is None


async def test_send_email_events_get_fresh_event_ids() -> None:
    """Handling the same command twice yields two events with different event ids (same message id)."""
    first = await send_email(MAIL, CTX, RecordingMailer())
    second = await send_email(MAIL, CTX, RecordingMailer())

    assert first.event_id != second.event_id
    assert first.message_id == second.message_id


async def test_send_email_with_log_mailer() -> None:
    """The default `log` mailer sends nothing and reports a provider id derived from the message id."""
    event = await send_email(MAIL, CTX, LogMailer())

    assert event.provider_id == "log-msg-123"


@pytest.mark.parametrize("error", PORT_ERRORS, ids=PORT_ERROR_IDS)
async def test_send_email_propagates_mailer_errors_unchanged(error: Exception) -> None:
    """Whatever the mailer raises reaches the caller as the very same exception object."""
    with pytest.raises(type(error)) as info:
        await send_email(MAIL, CTX, RecordingMailer(error=error))

    assert info.value is error


# -- complete ------------------------------------------------------------------------------


async def test_complete_returns_completion_succeeded_with_context_ids() -> None:
    """CompletionSucceeded carries the context's ids, the task and model, and the model's answer."""
    event = await complete(ASK, CTX, EchoModel())

    assert isinstance(event, CompletionSucceeded)
    assert event.type == CompletionSucceeded.TYPE == "completion.succeeded"
    assert event.message_id == "msg-123"
    assert event.correlation_id == "corr-456"
    assert event.task_id == "task-9"
    assert event.model == "echo"
    assert event.completion == "echo: say hello world"
    assert (event.prompt_tokens, event.completion_tokens) == (3, 4)


async def test_complete_passes_prompt_model_and_message_id_as_idempotency_key() -> None:
    """The model is called once with the prompt, the command's model and idempotency_key = message id."""
    model = RecordingModel()

    await complete(ASK, CTX, model)

    assert model.calls == [("say hello world", "echo", "msg-123")]


async def test_echo_model_is_deterministic() -> None:
    """EchoModel answers the same prompt the same way every time."""
    answers = {await EchoModel().complete("same prompt", model="echo", idempotency_key=k) for k in "abc"}

    assert answers == {Completion(text="echo: same prompt", prompt_tokens=2, completion_tokens=3)}


@pytest.mark.parametrize("error", PORT_ERRORS, ids=PORT_ERROR_IDS)
async def test_complete_propagates_model_errors_unchanged(error: Exception) -> None:
    """Whatever the model raises reaches the caller as the very same exception object."""
    with pytest.raises(type(error)) as info:
        await complete(ASK, CTX, RecordingModel(error=error))

    assert info.value is error
