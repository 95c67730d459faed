"""The flow under FastStream's TestRabbitBroker, with a fake model through the dependency override."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import ModuleType

import pytest
from faststream.rabbit import TestRabbitBroker

from docs_src.writing_a_flow.flow import SUMMARY
from handlers.errors import DeliveryRejectedError
from handlers.ports import Completion
from streams.consume.routes import register
from streams.flows.deps import get_model


class FakeModel:
    """Answers with the ticket's first line; refuses a prompt that mentions `refuse` (as a 4xx would)."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Completion:
        self.keys.append(idempotency_key)
        if "refuse" in prompt:
            raise DeliveryRejectedError("the provider refused the prompt")
        ticket = prompt.split("\n\n", 1)[1]
        return Completion(text=ticket.splitlines()[0])


@pytest.fixture
async def summary_app(app: ModuleType) -> AsyncIterator[ModuleType]:
    """The app with the flow registered, as `streams.app` registers the catalog's flows at import."""
    if "rabbit:ticket.summary" not in app.subscribers:  # once a test session
        flows = [SUMMARY]
        app.subscribers.update(
            register(app.rabbit, app.redis, app.pipeline, app.settings, app.publishers, consumer="test", flows=flows)
        )
    async with TestRabbitBroker(app.rabbit):
        yield app


async def test_a_ticket_is_summarised(summary_app: ModuleType) -> None:
    """A valid command runs the handler with the overridden model and publishes `ticket.summarised`."""
    app, model = summary_app, FakeModel()
    message_id = str(uuid.uuid4())
    with app.rabbit.provider.scope(get_model, lambda: model):
        body = {"ticket_id": "T-1", "text": "Printer on fire.\nPlease advise."}
        await app.rabbit.publish(body, exchange="tasks", routing_key="ticket.summary", message_id=message_id)
        await app.pipeline.relay.flush()  # outcomes leave through the outbox

    assert model.keys == [message_id]  # the message id is the idempotency key
    published = app.publishers.rabbit_events["ticket.summarised"].mock
    published.assert_called_once()
    event = published.call_args.args[0]
    assert (event["ticket_id"], event["summary"], event["message_id"]) == ("T-1", "Printer on fire.", message_id)


async def test_a_refused_ticket_fails_for_good(summary_app: ModuleType) -> None:
    """A fatal error is not retried: `ticket.summary_failed`, and the command is dead-lettered as `fatal`."""
    app, model = summary_app, FakeModel()
    with app.rabbit.provider.scope(get_model, lambda: model):
        body = {"ticket_id": "T-2", "text": "Please refuse this."}
        await app.rabbit.publish(body, exchange="tasks", routing_key="ticket.summary")
        await app.pipeline.relay.flush()

    assert len(model.keys) == 1  # one attempt
    failed = app.publishers.rabbit_events["ticket.summary_failed"].mock
    failed.assert_called_once()
    assert failed.call_args.args[0]["failure_kind"] == "fatal"
    app.publishers.rabbit_dead_letters["ticket.summary"].mock.assert_called_once()
