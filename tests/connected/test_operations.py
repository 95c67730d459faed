"""Operations against real brokers: breaker pause, graceful SIGTERM, scale-out, broker restarts, readiness."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from typing import Any

import aio_pika
import httpx2
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from streams.core import names
from tests.connected.conftest import RabbitProbe, RedisProbe, Worker, wait_until
from tests.connected.harness import Bus, Workers, email
from tests.connected.rabbitserver import RabbitServer
from tests.connected.redisserver import RedisServer
from tests.httpserver import RecordingServer, ScriptedResponse


async def ready(worker: Worker) -> tuple[int, dict[str, Any]]:
    async with httpx2.AsyncClient() as client:
        response = await client.get(worker.base_url + "/health/ready", timeout=5)
    return response.status_code, response.json()


async def depth(bus: Bus, rabbit_url: str = "amqp://guest:guest@127.0.0.1:5672/") -> int:
    """Messages waiting in the `email` queue (ready) or stream (lag + pending)."""
    if bus.broker == "rabbit":
        conn = await aio_pika.connect(rabbit_url)
        try:
            channel = await conn.channel()
            queue = await channel.declare_queue("email", passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await conn.close()
    for info in await bus.redis.client.xinfo_groups("email"):
        if info["name"] == names.EMAIL_GROUP.encode():
            return int(info.get("lag") or 0)
    return 0


async def test_open_breaker_stops_consumption_without_spending_attempts(
    bus: Bus, workers: Workers, mail_server: RecordingServer
) -> None:
    """Mailer down: the breaker opens, the queue grows, no attempt is spent; after recovery it all drains."""
    worker = await workers.start(
        PIPELINE_BREAKER_THRESHOLD="3",
        PIPELINE_BREAKER_RECOVERY_SECONDS="12",
        PIPELINE_RABBIT_PREFETCH="2",
        PIPELINE_REDIS_MAX_WORKERS="2",
        PIPELINE_REDIS_READ_COUNT="2",
        PIPELINE_RETRY_BASE_DELAY="2",
    )
    mail_server.default = ScriptedResponse(503, {"error": "down"})  # after ready: an open breaker is not ready
    first = [await bus.send("email", email()) for _ in range(3)]

    async def opened() -> bool:
        status, body = await ready(worker)
        return status == 503 and body["checks"].get("breaker:mailer") == "open"

    await wait_until(opened, 20)
    calls_at_open = len(mail_server.requests)
    before = await depth(bus)
    held = [await bus.send("email", email()) for _ in range(10)]

    async def grown() -> bool:
        return await depth(bus) >= before + 6  # at most prefetch / read window held in the worker

    try:
        await wait_until(grown, 10)
    except AssertionError as exc:
        raise AssertionError(
            f"depth {before} -> {await depth(bus)}; calls {calls_at_open} -> {len(mail_server.requests)}"
            f"\n{worker.log()[-4000:]}"
        ) from exc
    assert len(mail_server.requests) == calls_at_open, "no attempt while the breaker is open"
    switched_at = time.monotonic()
    mail_server.default = ScriptedResponse(200, {"id": "back"})
    for mid in first + held:
        try:
            await bus.event(names.EMAIL_SENT, mid, timeout=60)
        except AssertionError as exc:
            lines = [ln for ln in worker.log().splitlines() if '"pipeline' in ln or "breaker" in ln]
            raise AssertionError(f"{mid} never sent\n" + "\n".join(lines[-40:])) from exc
    for mid in held:
        calls = mail_server.requests_for(mid)
        assert len(calls) == 1, f"tried once: {[round(c.received_at - switched_at, 2) for c in calls]}"
    status, _ = await ready(worker)
    assert status == 200


async def test_sigterm_during_slow_handlers_loses_nothing_and_handles_nothing_twice(
    bus: Bus, workers: Workers, mail_server: RecordingServer
) -> None:
    """SIGTERM mid-batch: in-flight handlers finish, the rest go back; a new worker handles them, once each."""
    mail_server.default = ScriptedResponse(200, {"id": "slow"}, delay=1.5)
    first = await workers.start()
    mids = [await bus.send("email", email()) for _ in range(12)]
    await asyncio.to_thread(mail_server.wait_for_requests, 2, 20)
    first.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(first.proc.wait, 40)
    assert code in (0, -signal.SIGTERM), f"clean exit, got {code}"
    await workers.start()
    for mid in mids:
        await bus.event(names.EMAIL_SENT, mid, timeout=60)
    for mid in mids:
        assert len(mail_server.requests_for(mid)) == 1, f"{mid} handled once"


async def test_three_processes_split_the_load_with_no_duplicate_effect(
    workers: Workers, mail_server: RecordingServer, rabbit_probe: RabbitProbe, redis_probe: RedisProbe
) -> None:
    """Three workers compete for both queues and streams: every message handled once, by all three."""
    pool = [await workers.start(PIPELINE_RABBIT_PREFETCH="8") for _ in range(3)]
    mids = []
    for i in range(240):
        if i % 2:
            mids.append(await rabbit_probe.publish("email", email()))
        else:
            mids.append(await redis_probe.publish("email", email()))

    async def all_requested() -> bool:
        return len({r.headers.get("idempotency-key") for r in mail_server.requests} & set(mids)) == len(mids)

    await wait_until(all_requested, 90, interval=0.5)
    for mid in mids:
        assert len(mail_server.requests_for(mid)) == 1, f"{mid} handled once"
    shares = [sum(1 for line in w.log().splitlines() if '"handled"' in line) for w in pool]
    print(f"handled per worker: {shares}")
    assert all(share > 0 for share in shares), f"every worker took part: {shares}"


async def test_rabbitmq_restart_under_load_is_survived(workers: Workers) -> None:
    """A RabbitMQ restart under load: ready goes 503 naming it, then consumption resumes within 30 s, none lost."""
    with RabbitServer() as server:
        worker = await workers.start(PIPELINE_RABBIT_URL=server.url)
        conn = await aio_pika.connect_robust(server.url)
        channel = await conn.channel()
        events = await channel.get_exchange("events")
        probe = await channel.declare_queue(f"probe-{uuid.uuid4().hex[:8]}", durable=True)
        await probe.bind(events, routing_key="#")
        tasks = await channel.get_exchange("tasks")
        mids: list[str] = []

        async def publish(n: int) -> None:
            for _ in range(n):
                mid = str(uuid.uuid4())
                await tasks.publish(
                    aio_pika.Message(email(), message_id=mid, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key="email",
                )
                mids.append(mid)

        await publish(50)
        await asyncio.to_thread(server.stop_app)
        down = time.monotonic()

        async def unready() -> bool:
            status, body = await ready(worker)
            return status == 503 and body["checks"]["rabbitmq"] == "failing"

        await wait_until(unready, 15)
        await asyncio.sleep(3)
        await asyncio.to_thread(server.start_app)
        back = time.monotonic()

        async def consuming() -> bool:
            status, _ = await ready(worker)
            return status == 200

        await wait_until(consuming, 30)
        resumed = time.monotonic() - back
        await wait_until(lambda: _reconnected(channel), 30)
        await publish(50)
        received: set[str] = set()

        async def all_out() -> bool:
            while (msg := await probe.get(no_ack=True, fail=False)) is not None:
                if msg.routing_key == names.EMAIL_SENT:
                    received.add(json.loads(msg.body)["message_id"])
            return set(mids) <= received

        await wait_until(all_out, 60, interval=0.3)
        print(f"RabbitMQ down {back - down:.1f}s; worker ready again {resumed:.1f}s after the broker came back")
        assert resumed < 30
        await conn.close()


async def _reconnected(channel: Any) -> bool:
    return not channel.is_closed


async def test_redis_restart_under_load_is_survived(workers: Workers) -> None:
    """A Redis restart under load: ready goes 503 naming it, then consumption resumes within 30 s."""
    with RedisServer() as server:
        worker = await workers.start(PIPELINE_REDIS_URL=server.url)
        client: Any = aioredis.from_url(server.url)
        mids: list[str] = []

        async def publish(n: int) -> None:
            for _ in range(n):
                mid = str(uuid.uuid4())
                envelope = await BinaryMessageFormatV1.encode(
                    message=email(), reply_to=None, headers={"message-id": mid}, correlation_id=mid
                )
                await client.xadd("email", {"__data__": envelope})
                mids.append(mid)

        await publish(20)
        await asyncio.to_thread(server.stop)
        down = time.monotonic()

        async def unready() -> bool:
            status, body = await ready(worker)
            return status == 503 and body["checks"]["redis"] == "failing"

        await wait_until(unready, 15)
        await asyncio.sleep(3)
        await asyncio.to_thread(server.start)
        back = time.monotonic()
        await client.aclose()
        client = aioredis.from_url(server.url)
        await publish(30)  # the restart lost everything before: these must all be handled
        after = mids[20:]
        seen: set[str] = set()

        async def all_handled() -> bool:
            for _eid, fields in await client.xrange("events"):
                body, _ = BinaryMessageFormatV1.parse(fields[b"__data__"])
                seen.add(json.loads(body)["message_id"])
            return set(after) <= seen

        await wait_until(all_handled, 60, interval=0.3)
        resumed = time.monotonic() - back
        status, _ = await ready(worker)
        print(f"Redis down {back - down:.1f}s; all post-restart messages handled {resumed:.1f}s after it came back")
        assert status == 200
        assert resumed < 30
        await client.aclose()
