"""Publishing commands from your own service: plain FastStream, no pipeline code needed (docs/contract.md)."""

from __future__ import annotations

import uuid

from faststream.rabbit import RabbitBroker, TestRabbitBroker
from faststream.rabbit.annotations import RabbitMessage
from faststream.redis import RedisBroker, StreamSub, TestRedisBroker
from faststream.redis.annotations import RedisStreamMessage


async def send_email(broker: RabbitBroker, to: str, subject: str, body: str) -> str:
    """Publish a SendEmail command to RabbitMQ; returns its message id (keep it: it is the idempotency key)."""
    message_id = str(uuid.uuid4())
    await broker.publish(
        {"to": to, "subject": subject, "body": body},
        exchange="tasks",
        routing_key="email",
        persist=True,  # survives a broker restart
        message_id=message_id,
        correlation_id=message_id,
        content_type="application/json",
    )
    return message_id


async def request_completion(broker: RedisBroker, task_id: str, prompt: str, model: str = "echo") -> str:
    """Publish a RequestCompletion command to Redis Streams; returns its message id."""
    message_id = str(uuid.uuid4())
    await broker.publish(
        {"task_id": task_id, "prompt": prompt, "model": model},
        stream="ai.completion",
        headers={"message-id": message_id},
        correlation_id=message_id,
    )
    return message_id


async def test_producer_publishes_where_the_workers_consume() -> None:
    """The commands land on queue `email` (exchange `tasks`) and stream `ai.completion` with their ids."""
    rabbit, redis = RabbitBroker(), RedisBroker()
    ids: dict[str, str | None] = {}

    @rabbit.subscriber("email", exchange="tasks")
    async def email(body: dict[str, str], msg: RabbitMessage) -> None:
        ids["email"] = msg.message_id

    @redis.subscriber(stream=StreamSub("ai.completion"))
    async def completion(body: dict[str, str], msg: RedisStreamMessage) -> None:
        ids["completion"] = msg.headers.get("message-id")

    async with TestRabbitBroker(rabbit) as r, TestRedisBroker(redis) as s:
        email_id = await send_email(r, "ada@example.com", "Welcome", "Hello Ada")
        completion_id = await request_completion(s, "T1", "Say hi")

        email.mock.assert_called_once_with({"to": "ada@example.com", "subject": "Welcome", "body": "Hello Ada"})
        completion.mock.assert_called_once_with({"task_id": "T1", "prompt": "Say hi", "model": "echo"})
    assert ids == {"email": email_id, "completion": completion_id}
