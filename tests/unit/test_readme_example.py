"""The README's test example, as FastStream's docs teach it: the app's own brokers under TestBroker,
a fake mailer through FastStream's dependency override. Keep it in step with README.md."""

from __future__ import annotations

from faststream.rabbit import TestRabbitBroker

from schemas import SendEmail
from streams.eventstore.store import EventStore
from streams.flows.deps import get_mailer


class FakeMailer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str:
        self.sent.append(str(mail.to))
        return "fake-1"


async def test_send_email_is_sent_once(app_store: EventStore) -> None:
    from streams.app import pipeline, publishers, rabbit

    mailer = FakeMailer()
    with rabbit.provider.scope(get_mailer, lambda: mailer):
        async with TestRabbitBroker(rabbit) as broker:
            body = {"to": "ada@example.com", "subject": "Hi", "body": "Hello"}
            await broker.publish(body, exchange="tasks", routing_key="email", message_id="m-1")
            await broker.publish(body, exchange="tasks", routing_key="email", message_id="m-1")  # again
            await pipeline.relay.flush()  # outcomes leave through the outbox

            assert mailer.sent == ["ada@example.com"]  # the inbox made the second delivery a no-op
            sent = publishers.rabbit_events["email.sent"].mock
            sent.assert_called_once()
            assert sent.call_args.args[0]["message_id"] == "m-1"
