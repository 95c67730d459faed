"""The event store end to end, on SQLite and on PostgreSQL: idempotent handling, outbox through an outage.

Each test runs real worker processes (HTTP mailer at a scripted local server) on one store.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from streams.core import names
from streams.eventstore import schema
from tests.conftest import require
from tests.connected.conftest import wait_until
from tests.connected.harness import Bus, Workers, email
from tests.connected.rabbitserver import RabbitServer
from tests.httpserver import RecordingServer, ScriptedResponse

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, scratch_dir: Path) -> AsyncIterator[str]:
    """A fresh store: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{scratch_dir / 'store.db'}"
        return
    require("postgresql")
    name = f"pipeline_e2e_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        await schema.upgrade(url)  # as an operator would: `pipeline db upgrade` before the workers
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pool(services: None, scratch_dir: Path, mail_server: RecordingServer, db_url: str) -> AsyncIterator[Workers]:
    workers = Workers(scratch_dir, mail_server.url_for("/send"), db_url)
    yield workers
    workers.stop_all()


async def count_log(worker_logs: list[str], needle: str, mid: str) -> int:
    return sum(1 for log in worker_logs for line in log.splitlines() if needle in line and mid in line)


async def test_same_message_id_twice_has_one_effect(bus: Bus, pool: Workers, mail_server: RecordingServer) -> None:
    """A command re-published with the same message id: one mailer call, one stored event, one outcome."""
    worker = await pool.start()
    mid = str(uuid.uuid4())
    await bus.send("email", email(), mid)
    await bus.event(names.EMAIL_SENT, mid)
    await bus.send("email", email(), mid)

    async def skipped() -> bool:
        return await count_log([worker.log()], "duplicate skipped", mid) >= 1

    await wait_until(skipped, 20)
    assert len(mail_server.requests_for(mid)) == 1
    assert await pool.event_types(f"email-{mid}") == [names.EMAIL_SENT]
    rows = await pool.rows("SELECT count(*) FROM outbox WHERE message_id = :m", m=mid)
    assert rows == [(1,)], "one outcome in the outbox, so one published"


async def test_sigkill_between_commit_and_ack_has_one_effect(
    bus: Bus, pool: Workers, mail_server: RecordingServer
) -> None:
    """Killed after the commit, before the ack: the redelivered message is skipped; the outcome goes out once."""
    marker = f"after-commit-{uuid.uuid4().hex[:8]}"
    victim = await pool.start(PIPELINE_FAULT_CRASH_MARKER=marker, PIPELINE_FAULT_CRASH_POINTS="after_commit")
    mid = str(uuid.uuid4())
    await bus.send("email", email(marker), mid)
    await asyncio.to_thread(victim.proc.wait, 30)
    assert victim.proc.returncode == -signal.SIGKILL, "the crash point fired"
    assert await pool.event_types(f"email-{mid}") == [names.EMAIL_SENT], "committed before the kill"
    successor = await pool.start()
    event = await bus.event(names.EMAIL_SENT, mid, timeout=40)  # the orphaned outbox row is taken over
    assert event["message_id"] == mid

    async def skipped() -> bool:
        return await count_log([successor.log()], "duplicate skipped", mid) >= 1

    await wait_until(skipped, 30)
    assert len(mail_server.requests_for(mid)) == 1, "the side effect happened once"
    assert await pool.event_types(f"email-{mid}") == [names.EMAIL_SENT]


async def test_outcomes_wait_in_the_outbox_while_rabbitmq_is_down(
    services: None, scratch_dir: Path, mail_server: RecordingServer, db_url: str
) -> None:
    """RabbitMQ stops mid-handling: outcomes are stored, then published in order once it is back; none lost."""
    with RabbitServer() as rabbit:
        pool = Workers(scratch_dir, mail_server.url_for("/send"), db_url)
        try:
            await _outage_scenario(rabbit, pool, mail_server)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{pool.started[0].log()[-6000:]}") from exc
        finally:
            pool.stop_all()


async def _outage_scenario(rabbit: RabbitServer, pool: Workers, mail_server: RecordingServer) -> None:
    await pool.start(PIPELINE_RABBIT_URL=rabbit.url)
    conn = await aio_pika.connect(rabbit.url)
    channel = await conn.channel()
    events = await channel.get_exchange("events")
    probe_name = f"probe-{uuid.uuid4().hex[:8]}"
    probe = await channel.declare_queue(probe_name, durable=True)  # survives the broker restart
    await probe.bind(events, routing_key="#")
    tasks = await channel.get_exchange("tasks")
    mids = [str(uuid.uuid4()) for _ in range(6)]
    for mid in mids:
        mail_server.script_for(mid, ScriptedResponse(200, {"id": mid}, delay=4.0))
        await tasks.publish(
            aio_pika.Message(email(), message_id=mid, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="email",
        )
    await conn.close()
    await asyncio.to_thread(mail_server.wait_for_requests, 1, 20)
    down_at = time.monotonic()
    await asyncio.to_thread(rabbit.stop_app)

    async def stored_while_down() -> bool:
        rows = await pool.rows("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return bool(rows[0][0] >= 1)

    await wait_until(stored_while_down, 20)  # the in-flight handler committed; the relay cannot publish
    await asyncio.sleep(3)
    await asyncio.to_thread(rabbit.start_app)
    print(f"RabbitMQ down for {time.monotonic() - down_at:.1f}s")

    conn = await aio_pika.connect(rabbit.url)
    channel = await conn.channel()
    probe = await channel.declare_queue(probe_name, durable=True, passive=True)
    received: list[str] = []

    async def all_received() -> bool:
        while (msg := await probe.get(no_ack=True, fail=False)) is not None:
            if msg.routing_key == names.EMAIL_SENT:
                received.append(json.loads(msg.body)["message_id"])
        return set(mids) <= set(received)

    await wait_until(all_received, 90, interval=0.3)
    await conn.close()
    assert sorted(received) == sorted(mids), "every outcome exactly once (no duplicates, none lost)"
    outbox_order = [
        r[0] for r in await pool.rows("SELECT message_id FROM outbox WHERE event_type = 'email.sent' ORDER BY id")
    ]
    assert received == [m for m in outbox_order if m in mids], "published in commit order"
    for mid in mids:
        assert len(mail_server.requests_for(mid)) == 1, f"{mid} handled once"
