"""Test a flow as FastStream's docs teach: the app's own brokers under TestRabbitBroker, a fake mailer
given through FastStream's dependency override; the same subscribers, middleware and event store run
as in a worker."""

from __future__ import annotations

import uuid
from types import ModuleType

from faststream.rabbit import TestRabbitBroker

from schemas import SendEmail
from streams.flows.deps import get_mailer


class FakeMailer:
    """Records the recipients instead of sending."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str:
        self.sent.append(str(mail.to))
        return "fake-1"


async def test_send_email_is_sent_once(app: ModuleType) -> None:
    """A command delivered twice with one message id sends one e-mail and publishes one `email.sent`."""
    mailer = FakeMailer()
    message_id = str(uuid.uuid4())
    with app.rabbit.provider.scope(get_mailer, lambda: mailer):
        async with TestRabbitBroker(app.rabbit) as broker:
            body = {"to": "ada@example.com", "subject": "Hi", "body": "Hello"}
            await broker.publish(body, exchange="tasks", routing_key="email", message_id=message_id)
            await broker.publish(body, exchange="tasks", routing_key="email", message_id=message_id)  # again
            await app.pipeline.relay.flush()  # outcomes leave through the outbox

            assert mailer.sent == ["ada@example.com"]  # the inbox made the second delivery a no-op
            sent = app.publishers.rabbit_events["email.sent"].mock
            sent.assert_called_once()
            assert sent.call_args.args[0]["message_id"] == message_id
