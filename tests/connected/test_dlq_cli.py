"""`pipeline dlq replay|purge` as a real process against the local RabbitMQ and Redis.

Every test works on its own throwaway queue or stream (`test-replay-<uuid>`), never on `email`
or `ai.completion`, which a worker of another test may be consuming.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from handlers.errors import TransientError
from schemas import FailureKind
from streams import deadletters
from streams.core import names
from streams.core.envelope import Envelope
from streams.deadletters import DeadLetter
from streams.eventstore.store import EventStore
from streams.policy.failures import Failure
from tests.conftest import require

pytestmark = pytest.mark.connected

ROOT = Path(__file__).resolve().parents[2]
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
DEADLINE = 15.0
BODY = b'{"to": "ada@example.com", "subject": "Replayed", "body": "Hi \xc3\xa9"}'
RETRY_HEADERS = {
    names.H_ATTEMPTS: "5",
    names.H_FIRST_FAILURE_AT: "2024-01-01T00:00:00+00:00",
    names.H_LAST_FAILURE_AT: "2024-01-01T00:05:00+00:00",
    names.H_EXCEPTION_TYPE: "handlers.errors.TransientError",
    names.H_EXCEPTION_MESSAGE: "provider down",
}


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def pipeline_command() -> list[str]:
    """The installed entry point next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "streams.cli"]


async def run_cli(db_url: str, *args: str, stdin: bytes | None = None) -> Run:
    env = {
        **os.environ,
        "PIPELINE_DATABASE_URL": db_url,
        "PIPELINE_RABBIT_URL": RABBIT_URL,
        "PIPELINE_REDIS_URL": REDIS_URL,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    proc = await asyncio.create_subprocess_exec(
        *pipeline_command(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), DEADLINE)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def record(db_url: str, env: Envelope) -> int:
    """Keep `env` as an exhausted dead letter, exactly as the pipeline does."""
    try:
        raise TransientError("provider down")
    except TransientError as exc:
        fail = Failure.of(exc, FailureKind.EXHAUSTED, env)
    store = EventStore(db_url)
    try:
        await store.start()
        return await store.record_dead_letter(env, fail)
    finally:
        await store.close()


async def load(db_url: str, dead_letter_id: int) -> DeadLetter | None:
    async with deadletters.open_store(db_url) as engine:
        return await deadletters.get_letter(engine, dead_letter_id)


def temp_name() -> str:
    return f"test-replay-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'dlq.db'}"


@pytest.fixture
async def rabbit() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    require("rabbitmq", "redis")
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


@pytest.fixture
async def redis_client() -> AsyncIterator[Any]:
    require("rabbitmq", "redis")
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def take(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message on `queue`, waiting at most DEADLINE seconds (the CLI exits after the confirm)."""
    async with asyncio.timeout(DEADLINE), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message
    raise AssertionError("unreachable")


# --- replay ----------------------------------------------------------------------------------------------


async def test_replay_rabbit_puts_the_message_back_with_its_ids_and_no_retry_headers(
    rabbit: aio_pika.abc.AbstractChannel, db_url: str
) -> None:
    name = temp_name()
    queue = await rabbit.declare_queue(name, durable=False, auto_delete=True)
    try:
        mid, cid = f"dlq-{uuid.uuid4()}", f"corr-{uuid.uuid4()}"
        headers = {"content-type": "application/json", names.H_MESSAGE_ID: mid, names.H_CORRELATION_ID: cid}
        env = Envelope("rabbit", name, mid, cid, BODY, {**headers, **RETRY_HEADERS, "tenant": "acme"}, attempt=5)
        dead_letter_id = await record(db_url, env)

        run = await run_cli(db_url, "dlq", "replay", str(dead_letter_id))

        assert run.code == 0, run.stderr
        assert f"replayed {dead_letter_id} to RabbitMQ queue {name!r}" in run.stdout
        message = await take(queue)
        assert message.body == BODY
        assert (message.message_id, message.correlation_id) == (mid, cid)
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        received = dict(message.headers)
        assert received[names.H_MESSAGE_ID] == mid
        assert received[names.H_CORRELATION_ID] == cid
        assert received["tenant"] == "acme"
        assert received[deadletters.H_REPLAYED_FROM] == str(dead_letter_id)
        assert not set(received) & set(RETRY_HEADERS)
        row = await load(db_url, dead_letter_id)
        assert row is not None
        assert row.replayed_at is not None
    finally:
        await queue.delete(if_unused=False, if_empty=False)


async def test_replay_redis_adds_the_entry_back_with_identical_body_bytes(redis_client: Any, db_url: str) -> None:
    stream = temp_name()
    mid = f"dlq-{uuid.uuid4()}"
    inner = {names.H_MESSAGE_ID: mid, "message_id": mid, "content-type": "application/json", **RETRY_HEADERS}
    data = await BinaryMessageFormatV1.encode(message=BODY, reply_to=None, headers=inner, correlation_id=mid)
    _, parsed = BinaryMessageFormatV1.parse(data)
    fields = {b"__data__": data, names.H_ATTEMPTS.encode(): b"5"}
    env = Envelope("redis", stream, mid, mid, BODY, parsed, attempt=5, fields=fields, entry_id="1-0")
    try:
        dead_letter_id = await record(db_url, env)

        run = await run_cli(db_url, "dlq", "replay", str(dead_letter_id))

        assert run.code == 0, run.stderr
        [(_entry_id, entry)] = await redis_client.xrange(stream)
        assert set(entry) == {b"__data__"}
        body, headers = BinaryMessageFormatV1.parse(entry[b"__data__"])
        assert body == BODY
        assert headers["message_id"] == headers[names.H_MESSAGE_ID] == mid
        assert headers["correlation_id"] == mid
        assert headers[deadletters.H_REPLAYED_FROM] == str(dead_letter_id)
        assert not set(headers) & set(RETRY_HEADERS)
        row = await load(db_url, dead_letter_id)
        assert row is not None
        assert row.replayed_at is not None
    finally:
        await redis_client.delete(stream)


async def test_replay_to_a_missing_queue_fails_and_leaves_the_row_unreplayed(
    rabbit: aio_pika.abc.AbstractChannel, db_url: str
) -> None:
    name = temp_name()  # never declared: RabbitMQ returns the message
    env = Envelope("rabbit", name, "m-missing", "m-missing", BODY, {"content-type": "application/json"})
    dead_letter_id = await record(db_url, env)

    run = await run_cli(db_url, "dlq", "replay", str(dead_letter_id))

    assert run.code == 1
    assert f"there is no queue {name!r}" in run.stderr
    assert "Traceback" not in run.stderr
    row = await load(db_url, dead_letter_id)
    assert row is not None
    assert row.replayed_at is None


# --- purge --------------------------------------------------------------------------------------------------


async def test_purge_broker_queues_empties_the_dlq_queue_and_stream_only_when_confirmed(
    rabbit: aio_pika.abc.AbstractChannel, redis_client: Any, db_url: str
) -> None:
    name = temp_name()
    dlq = await rabbit.declare_queue(names.dlq(name), durable=False, auto_delete=True)
    try:
        for _ in range(3):
            await rabbit.default_exchange.publish(aio_pika.Message(BODY), routing_key=names.dlq(name))
        await redis_client.xadd(names.dlq(name), {b"k": b"v"})
        await redis_client.xadd(names.dlq(name), {b"k": b"w"})
        rabbit_id = await record(db_url, Envelope("rabbit", name, "m-r", "m-r", BODY, {}))
        redis_id = await record(db_url, Envelope("redis", name, "m-s", "m-s", BODY, {}, fields={b"k": b"v"}))

        declined = await run_cli(db_url, "dlq", "purge", "--queue", name, "--broker-queues", stdin=b"n\n")

        assert declined.code == 1
        assert f"would empty RabbitMQ queue {names.dlq(name)!r} (3 messages in it now" in declined.stdout
        assert f"would trim Redis stream {names.dlq(name)!r} to 0 (2 messages in it now" in declined.stdout
        assert await redis_client.xlen(names.dlq(name)) == 2
        assert await load(db_url, rabbit_id) is not None

        run = await run_cli(db_url, "dlq", "purge", "--queue", name, "--broker-queues", "--yes")

        assert run.code == 0, run.stderr
        assert f"emptied RabbitMQ queue {names.dlq(name)!r}: 3 messages removed" in run.stdout
        assert f"emptied Redis stream {names.dlq(name)!r}: 2 messages removed" in run.stdout
        assert "deleted 2 dead letters from the database" in run.stdout
        assert (await rabbit.declare_queue(names.dlq(name), passive=True)).declaration_result.message_count == 0
        assert await redis_client.xlen(names.dlq(name)) == 0
        assert await load(db_url, rabbit_id) is None
        assert await load(db_url, redis_id) is None
    finally:
        await dlq.delete(if_unused=False, if_empty=False)
        await redis_client.delete(names.dlq(name))
