"""The real `pipeline` executable against the local RabbitMQ and Redis: what it prints is what arrives."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from faststream.redis.parser.binary import BinaryMessageFormatV1

from schemas import RequestCompletion, SendEmail
from streams.cli import send
from streams.core import names

pytestmark = pytest.mark.connected

ROOT = Path(__file__).resolve().parents[2]
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
DEADLINE = 15.0  # seconds to wait for anything: a CLI run, a delivery


def require(service: str, port: int) -> None:
    """Skip when the server does not answer; in CI (`CI=true`) that is a failure instead."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        message = f"{service} is not answering on 127.0.0.1:{port}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def message_id(self) -> str:
        return self.stdout.splitlines()[0]


def pipeline_command() -> list[str]:
    """The installed entry point next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "streams.cli"]


async def run_cli(*args: str) -> Run:
    env = {
        **os.environ,
        "PIPELINE_RABBIT_URL": RABBIT_URL,
        "PIPELINE_REDIS_URL": REDIS_URL,
        # The project root on the path, whatever the editable install maps.
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    proc = await asyncio.create_subprocess_exec(
        *pipeline_command(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


# --- RabbitMQ ---------------------------------------------------------------------------------------


@pytest.fixture
async def rabbit_channel() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    require("RabbitMQ", 5672)
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        # Same declaration as the worker's (durable direct): a no-op when it already ran.
        await channel.declare_exchange(names.TASKS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
        yield channel
    finally:
        await connection.close()


async def tap(channel: aio_pika.abc.AbstractChannel, routing_key: str) -> AbstractQueue:
    """A temporary exclusive queue that gets a copy of everything routed to `routing_key` on `tasks`."""
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(names.TASKS_EXCHANGE, routing_key=routing_key)
    return queue


async def receive(queue: AbstractQueue, message_id: str) -> AbstractIncomingMessage:
    """The message with this id, waiting at most DEADLINE seconds."""
    async with asyncio.timeout(DEADLINE), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            if message.message_id == message_id:
                return message
    raise AssertionError("unreachable")


def assert_delivered(message: AbstractIncomingMessage, message_id: str, correlation_id: str) -> None:
    assert message.message_id == message_id
    assert message.correlation_id == correlation_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.headers[names.H_MESSAGE_ID] == message_id
    assert message.headers[names.H_CORRELATION_ID] == correlation_id


async def test_send_email_to_rabbit(rabbit_channel: aio_pika.abc.AbstractChannel) -> None:
    queue = await tap(rabbit_channel, names.EMAIL_QUEUE)

    run = await run_cli("send", "email", "--to", "cli-connected@example.com", "--subject", "Connected", "--body", "Hi.")

    assert run.code == 0, run.stderr
    mid = run.message_id
    assert run.stdout == mid + "\n"
    uuid.UUID(mid)
    message = await receive(queue, mid)
    assert_delivered(message, mid, mid)
    expected = SendEmail(to="cli-connected@example.com", subject="Connected", body="Hi.")
    assert json.loads(message.body) == expected.model_dump(mode="json")
    assert "guest:guest" not in run.stderr


async def test_send_completion_to_rabbit_with_given_ids(rabbit_channel: aio_pika.abc.AbstractChannel) -> None:
    queue = await tap(rabbit_channel, names.COMPLETION_QUEUE)
    mid, cid, task = (f"cli-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("msg", "corr", "task"))

    run = await run_cli(
        "send", "completion", "--prompt", "Say hi.", "--task-id", task,
        "--message-id", mid, "--correlation-id", cid,
    )  # fmt: skip

    assert run.code == 0, run.stderr
    assert run.message_id == mid
    message = await receive(queue, mid)
    assert_delivered(message, mid, cid)
    expected = RequestCompletion(task_id=task, prompt="Say hi.", model="echo")
    assert json.loads(message.body) == expected.model_dump(mode="json")


async def test_unroutable_command_is_an_error(rabbit_channel: aio_pika.abc.AbstractChannel) -> None:
    # A routing key no queue is bound to: with `mandatory` RabbitMQ returns it, and the CLI says so.
    route = send.Route(f"cli-test.unbound.{uuid.uuid4().hex}", "unused", (names.EMAIL_SENT, names.EMAIL_FAILED))

    with pytest.raises(send.PublishError, match="no queue is bound"):
        await send._publish_rabbit(RABBIT_URL, route, {"x": 1}, message_id="m", correlation_id="c", io_timeout=DEADLINE)


async def test_invalid_input_publishes_nothing(rabbit_channel: aio_pika.abc.AbstractChannel) -> None:
    queue = await tap(rabbit_channel, names.EMAIL_QUEUE)
    mid = f"cli-invalid-{uuid.uuid4().hex[:8]}"

    run = await run_cli("send", "email", "--to", "nope", "--subject", "x", "--body", "y", "--message-id", mid)

    assert run.code == 2
    assert run.stdout == ""
    assert "invalid --to" in run.stderr
    # The queue sees a valid message sent after it, never the invalid one before it.
    probe = await run_cli("send", "email", "--to", "cli-connected@example.com", "--subject", "p", "--body", "p")
    assert probe.code == 0, probe.stderr
    seen: list[str | None] = []
    async with asyncio.timeout(DEADLINE), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            seen.append(message.message_id)
            if message.message_id == probe.message_id:
                break
    assert mid not in seen


# --- Redis ------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    require("Redis", 6379)
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def find_entry(client: aioredis.Redis, stream: str, message_id: str) -> tuple[bytes, dict[str, Any]]:
    """Body and headers of the newest entry in `stream` whose FastStream envelope has this message id.

    The CLI exits only after XADD returned, so the entry is there (or never will be).
    """
    raw: Any = await client.xrevrange(stream, count=1000)  # bytes in, bytes out (no decode_responses)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = raw
    for _entry_id, fields in entries:
        body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
        if headers.get(names.H_MESSAGE_ID) == message_id:
            return body, headers
    raise AssertionError(f"no entry with message id {message_id} among the last 1000 of {stream!r}")


def assert_headers(headers: dict[str, Any], message_id: str, correlation_id: str) -> None:
    assert headers[names.H_MESSAGE_ID] == message_id
    assert headers["message_id"] == message_id
    assert headers[names.H_CORRELATION_ID] == correlation_id
    assert headers["correlation_id"] == correlation_id
    assert headers["content-type"] == "application/json"


async def test_send_email_to_redis(redis_client: aioredis.Redis) -> None:
    run = await run_cli(
        "send", "email", "--to", "cli-connected@example.com", "--subject", "Redis", "--body", "Hi.",
        "--template", "welcome", "--broker", "redis",
    )  # fmt: skip

    assert run.code == 0, run.stderr
    mid = run.message_id
    assert run.stdout == mid + "\n"
    body, headers = await find_entry(redis_client, names.EMAIL_STREAM, mid)
    assert_headers(headers, mid, mid)
    expected = SendEmail(to="cli-connected@example.com", subject="Redis", body="Hi.", template="welcome")
    assert json.loads(body) == expected.model_dump(mode="json")


async def test_send_completion_to_redis_with_given_ids(redis_client: aioredis.Redis) -> None:
    mid, cid = f"cli-msg-{uuid.uuid4().hex[:8]}", f"cli-corr-{uuid.uuid4().hex[:8]}"

    run = await run_cli(
        "send", "completion", "--prompt", "Say hi.", "--task-id", "cli-task-1", "-b", "redis",
        "--message-id", mid, "--correlation-id", cid,
    )  # fmt: skip

    assert run.code == 0, run.stderr
    assert run.message_id == mid
    body, headers = await find_entry(redis_client, names.COMPLETION_STREAM, mid)
    assert_headers(headers, mid, cid)
    expected = RequestCompletion(task_id="cli-task-1", prompt="Say hi.", model="echo")
    assert json.loads(body) == expected.model_dump(mode="json")
