"""Connected tier: a real worker process (`faststream run streams.app:app`) against the local servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx2
import pytest
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
RABBIT_URL = os.environ.get("PIPELINE_RABBIT_URL", "amqp://guest:guest@localhost:5672/")
REDIS_URL = os.environ.get("PIPELINE_REDIS_URL", "redis://localhost:6379/0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/connected/" in str(item.fspath):
            item.add_marker(pytest.mark.connected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    """Poll an async predicate until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class Worker:
    """A running worker process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    db_url: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)


def start_worker(
    tmp: Path, env: dict[str, str] | None = None, name: str = "worker", *, forkserver: bool = False
) -> Worker:
    """Start `faststream run streams.app:app` (or its fork server) on a free port with its own SQLite file."""
    port = free_port()
    db_url = f"sqlite+aiosqlite:///{tmp / (name + '.db')}"
    log_path = tmp / f"{name}.log"
    full_env = {
        **os.environ,
        "PIPELINE_DATABASE_URL": db_url,
        "PIPELINE_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *(["streams.ops.forkserver"] if forkserver else ["faststream", "run", "streams.app:app"]),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(proc, port, log_path, db_url)


def wait_ready_sync(worker: Worker, timeout: float = 60) -> None:
    """Wait for `/health/ready` to answer 200 (blocking; for fixtures shared by many tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}")
        try:
            if httpx2.get(worker.base_url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"worker not ready within {timeout}s:\n{worker.log()[-3000:]}")


async def wait_ready(worker: Worker, timeout: float = 60) -> None:
    """Wait for `/health/ready` to answer 200."""
    await asyncio.to_thread(wait_ready_sync, worker, timeout)


@pytest.fixture(scope="module")
def services() -> None:
    """Skip (locally) or fail (CI) when a server is down."""
    require("rabbitmq", "redis")


@pytest.fixture(scope="module")
def worker(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker process shared by a test module, ready, stopped with SIGTERM afterwards."""
    w = start_worker(tmp_path_factory.mktemp("worker"))
    try:
        wait_ready_sync(w)
        yield w
    finally:
        w.stop()


class RabbitProbe:
    """A plain aio-pika client: publishes commands, listens to `events`, reads dead letters."""

    def __init__(self, conn: aio_pika.abc.AbstractRobustConnection, channel: aio_pika.abc.AbstractChannel) -> None:
        self.conn = conn
        self.channel = channel
        self.events: aio_pika.abc.AbstractQueue | None = None
        self.seen: list[tuple[dict[str, Any], Any]] = []

    @classmethod
    async def open(cls) -> RabbitProbe:
        conn = await aio_pika.connect_robust(RABBIT_URL)
        channel = await conn.channel()
        probe = cls(conn, channel)
        # Declared as the worker declares it, so a probe on a fresh broker does not depend on test order.
        exchange = await channel.declare_exchange("events", aio_pika.ExchangeType.TOPIC, durable=True)
        probe.events = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await probe.events.bind(exchange, routing_key="#")
        return probe

    async def close(self) -> None:
        await self.conn.close()

    async def publish(self, routing_key: str, body: bytes, *, message_id: str | None = None, **props: Any) -> str:
        mid = message_id or str(uuid.uuid4())
        tasks = await self.channel.get_exchange("tasks", ensure=True)
        props.setdefault("content_type", "application/json")
        await tasks.publish(
            aio_pika.Message(body, message_id=mid, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
            routing_key=routing_key,
        )
        return mid

    async def wait_event(self, event_type: str, message_id: str, timeout: float = 15) -> tuple[dict[str, Any], Any]:
        """The first event of that type answering that message id."""
        assert self.events is not None
        queue = self.events

        def find() -> tuple[dict[str, Any], Any] | None:
            for body, msg in self.seen:
                if msg.routing_key == event_type and body.get("message_id") == message_id:
                    return body, msg
            return None

        async def poll() -> tuple[dict[str, Any], Any] | None:
            # Everything read is kept: a test awaiting several events may read them in any order.
            while (msg := await queue.get(no_ack=True, fail=False)) is not None:
                self.seen.append((json.loads(msg.body), msg))
            return find()

        result: tuple[dict[str, Any], Any] = await wait_until(poll, timeout)
        return result

    async def take_dead_letter(self, queue_name: str, message_id: str, timeout: float = 15) -> Any:
        """Take (ack) the dead letter of `message_id` from `queue_name`; others are left in place."""
        channel = await self.conn.channel()
        queue = await channel.declare_queue(queue_name, passive=True)

        async def poll() -> Any:
            seen = []
            found = None
            msg = await queue.get(no_ack=False, fail=False)
            while msg is not None:
                if msg.message_id == message_id:
                    await msg.ack()
                    found = msg
                    break
                seen.append(msg)
                msg = await queue.get(no_ack=False, fail=False)
            for other in seen:
                await other.nack(requeue=True)
            return found

        try:
            return await wait_until(poll, timeout, interval=0.2)
        finally:
            await channel.close()


@pytest.fixture
async def rabbit_probe(services: None) -> AsyncIterator[RabbitProbe]:
    probe = await RabbitProbe.open()
    yield probe
    await probe.close()


class RedisProbe:
    """A plain redis-py client: XADDs commands, reads stream `events` and `<stream>.dlq`."""

    def __init__(self, client: Any) -> None:
        self.client = client  # redis.asyncio.Redis; typed Any: its stubs' unions add noise, not safety
        self.events_from = b"$"

    async def start(self) -> None:
        info = await self.client.xinfo_stream("events") if await self.client.exists("events") else None
        self.events_from = info["last-generated-id"] if info else b"0-0"

    async def publish(self, stream: str, body: bytes, *, message_id: str | None = None) -> str:
        mid = message_id or str(uuid.uuid4())
        envelope = await BinaryMessageFormatV1.encode(
            message=body,
            reply_to=None,
            headers={"message-id": mid, "content-type": "application/json"},
            correlation_id=mid,
        )
        await self.client.xadd(stream, {"__data__": envelope})
        return mid

    async def wait_event(self, event_type: str, message_id: str, timeout: float = 15) -> dict[str, Any]:
        async def poll() -> dict[str, Any] | None:
            for _, entries in await self.client.xread({"events": self.events_from}, count=500) or []:
                for _eid, fields in entries:
                    body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
                    data = json.loads(body)
                    if headers.get("event-type") == event_type and data.get("message_id") == message_id:
                        return dict(data)
            return None

        result: dict[str, Any] = await wait_until(poll, timeout, interval=0.2)
        return result

    async def dead_letter(self, stream: str, message_id: str, timeout: float = 15) -> dict[bytes, bytes]:
        async def poll() -> dict[bytes, bytes] | None:
            for _eid, fields in await self.client.xrevrange(stream, count=200):
                if fields.get(b"message-id") == message_id.encode():
                    return dict(fields)
            return None

        result: dict[bytes, bytes] = await wait_until(poll, timeout, interval=0.2)
        return result


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    """A client of the local Redis (no worker), closed after the test."""
    require("redis")
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_probe(services: None) -> AsyncIterator[RedisProbe]:
    client = aioredis.from_url(REDIS_URL)
    probe = RedisProbe(client)
    await probe.start()
    yield probe
    await client.aclose()


BROKERS = ["rabbit", "redis"]


@pytest.fixture(params=BROKERS)
def bus(request: pytest.FixtureRequest, rabbit_probe: RabbitProbe, redis_probe: RedisProbe) -> Any:
    """One broker at a time, seen from outside (tests parametrized over both)."""
    from tests.connected.harness import Bus

    return Bus(request.param, rabbit_probe, redis_probe)


@pytest.fixture
def mail_server() -> Iterator[Any]:
    """A scripted mail provider; 200 for any message without a script of its own."""
    from tests.httpserver import RecordingServer, ScriptedResponse

    with RecordingServer(default=ScriptedResponse(200, {"id": "ok"})) as server:
        yield server


@pytest.fixture
async def workers(services: None, scratch_dir: Path, mail_server: Any) -> AsyncIterator[Any]:
    """Worker processes with the HTTP mailer, sharing one SQLite store; all stopped afterwards."""
    from tests.connected.harness import Workers

    await clean_slate()
    pool = Workers(scratch_dir, mail_server.url_for("/send"))
    yield pool
    pool.stop_all()


async def clean_slate() -> None:
    """Empty the shared command queues, delay levels and streams, so no earlier test's leftovers
    (a retry coming due, a killed worker's pending entry) reach this test's fresh store."""
    from streams.core import names
    from streams.core.settings import DEPENDENCIES
    from streams.policy.limits import KEY_PREFIX
    from streams.transport import scheduler, topology

    conn = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await conn.channel()
        queues = [
            names.EMAIL_QUEUE,
            names.COMPLETION_QUEUE,
            *(topology.delay_queue(k).name for k in range(topology.DELAY_LEVELS)),
        ]
        for name in queues:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                channel = await conn.channel()  # not declared yet: nothing to purge
                continue
            await queue.purge()
    finally:
        await conn.close()
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        for stream in (names.EMAIL_STREAM, names.COMPLETION_STREAM):
            retries = await client.zrange(scheduler.schedule_key(stream), 0, -1)
            await client.delete(
                stream, scheduler.schedule_key(stream), *(scheduler.entry_key(stream, str(r)) for r in retries)
            )
        # An earlier test's pushback or schedule must not hold this one's workers back.
        await client.delete(*(f"{KEY_PREFIX}{d}{suffix}" for d in DEPENDENCIES for suffix in ("", ":leases")))
    finally:
        await client.aclose()
