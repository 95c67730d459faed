"""A real worker process against the real RabbitMQ and Redis: commands in, events out, bad input parked."""

from __future__ import annotations

import json
import uuid

import httpx2

from streams.core import names
from tests.connected.conftest import RabbitProbe, RedisProbe, Worker

EMAIL = {"to": "ada@example.com", "subject": "Welcome", "body": "Hello Ada"}


async def test_rabbit_email_yields_email_sent_on_events_exchange(worker: Worker, rabbit_probe: RabbitProbe) -> None:
    """A SendEmail published with plain aio-pika yields one persistent `email.sent` carrying its ids."""
    mid = await rabbit_probe.publish("email", json.dumps(EMAIL).encode(), correlation_id="corr-rabbit")
    body, msg = await rabbit_probe.wait_event(names.EMAIL_SENT, mid)
    assert body["correlation_id"] == "corr-rabbit"
    assert body["to"] == EMAIL["to"]
    assert msg.delivery_mode == 2, "outcome events are persistent"
    assert msg.headers["event-type"] == names.EMAIL_SENT


async def test_rabbit_completion_yields_completion_succeeded(worker: Worker, rabbit_probe: RabbitProbe) -> None:
    """A RequestCompletion on RabbitMQ is answered by `completion.succeeded` with the echo model's text."""
    task_id = str(uuid.uuid4())
    cmd = {"task_id": task_id, "prompt": "Say hi", "model": "echo"}
    mid = await rabbit_probe.publish("ai.completion", json.dumps(cmd).encode())
    body, _ = await rabbit_probe.wait_event(names.COMPLETION_SUCCEEDED, mid)
    assert body["task_id"] == task_id
    assert body["completion"] == "echo: Say hi"


async def test_redis_email_yields_email_sent_on_events_stream(worker: Worker, redis_probe: RedisProbe) -> None:
    """A SendEmail XADDed by plain redis-py yields `email.sent` on stream `events` with header event-type."""
    mid = await redis_probe.publish("email", json.dumps(EMAIL).encode())
    event = await redis_probe.wait_event(names.EMAIL_SENT, mid)
    assert event["message_id"] == mid


async def test_redis_completion_yields_completion_succeeded(worker: Worker, redis_probe: RedisProbe) -> None:
    """A RequestCompletion on Redis Streams is answered on stream `events`."""
    cmd = {"task_id": str(uuid.uuid4()), "prompt": "Say hi", "model": "echo"}
    mid = await redis_probe.publish("ai.completion", json.dumps(cmd).encode())
    event = await redis_probe.wait_event(names.COMPLETION_SUCCEEDED, mid)
    assert event["task_id"] == cmd["task_id"]


async def test_rabbit_garbage_lands_in_dlq_with_every_header(worker: Worker, rabbit_probe: RabbitProbe) -> None:
    """Undecodable bytes go to `email.dlq` untouched with all DESIGN.md headers, plus `message.dead_lettered`."""
    raw = b"\xff\xfe not json at all"
    mid = await rabbit_probe.publish("email", raw, correlation_id="corr-bad")
    dead = await rabbit_probe.take_dead_letter("email.dlq", mid)
    assert dead.body == raw
    headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in dead.headers.items()}
    for key in names.DEAD_LETTER_HEADERS:
        assert headers.get(key), key
    assert headers[names.H_FAILURE_KIND] == "invalid"
    assert headers[names.H_ORIGINAL_QUEUE] == "email"
    assert headers[names.H_CORRELATION_ID] == "corr-bad"
    assert dead.delivery_mode == 2
    event, _ = await rabbit_probe.wait_event(names.MESSAGE_DEAD_LETTERED, mid)
    assert event["failure_kind"] == "invalid"
    assert event["dead_letter_queue"] == "email.dlq"


async def test_redis_garbage_lands_in_dlq_stream_verbatim(worker: Worker, redis_probe: RedisProbe) -> None:
    """A schema-invalid Redis command goes to `email.dlq` with its entry fields verbatim plus the failure fields."""
    raw = b'{"subject": "no recipient"}'
    mid = await redis_probe.publish("email", raw)
    fields = await redis_probe.dead_letter("email.dlq", mid)
    assert fields[b"x-failure-kind"] == b"invalid"
    assert fields[b"x-original-queue"] == b"email"
    assert b"__data__" in fields
    event = await redis_probe.wait_event(names.MESSAGE_DEAD_LETTERED, mid)
    assert event["failure_kind"] == "invalid"


async def test_redis_plain_entry_without_envelope_is_dead_lettered(worker: Worker, redis_probe: RedisProbe) -> None:
    """An entry of arbitrary fields (no FastStream envelope, even invalid UTF-8) is parked, fields intact."""
    mid = str(uuid.uuid4())
    await redis_probe.client.xadd("email", {b"message-id": mid.encode(), b"junk": b"\xff\xfe\x00"})
    fields = await redis_probe.dead_letter("email.dlq", mid)
    assert fields[b"junk"] == b"\xff\xfe\x00"
    assert fields[b"x-failure-kind"] == b"invalid"


async def test_worker_keeps_running_after_bad_input(worker: Worker, rabbit_probe: RabbitProbe) -> None:
    """After a dead letter the same worker handles the next good command."""
    bad = await rabbit_probe.publish("email", b"{")
    await rabbit_probe.take_dead_letter("email.dlq", bad)
    good = await rabbit_probe.publish("email", json.dumps(EMAIL).encode())
    await rabbit_probe.wait_event(names.EMAIL_SENT, good)


async def test_health_metrics_and_docs(worker: Worker, rabbit_probe: RabbitProbe) -> None:
    """Ready names every check; metrics count handled messages; docs serve with try-it-out off."""
    mid = await rabbit_probe.publish("email", json.dumps(EMAIL).encode())
    await rabbit_probe.wait_event(names.EMAIL_SENT, mid)
    async with httpx2.AsyncClient(base_url=worker.base_url) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "healthy"
        assert set(body["checks"]) >= {"rabbitmq", "redis", "database", "subscribers"}
        consumers = (await client.get("/health/consumers")).json()
        assert set(consumers["checks"]) == {
            "rabbit:email",
            "rabbit:ai.completion",
            "redis:email",
            "redis:ai.completion",
            "redis:email:reclaim",
            "redis:ai.completion:reclaim",
        }
        assert all(check["running"] for check in consumers["checks"].values())
        metrics = (await client.get("/metrics")).text
        assert "pipeline_events_published_total" in metrics
        assert "faststream_received_messages_total" in metrics
        assert "guest:guest" not in metrics
        assert (await client.get("/docs/asyncapi")).status_code == 200
        assert (await client.post("/docs/asyncapi/try", json={})).status_code == 404


async def test_log_lines_carry_message_ids_and_no_password(worker: Worker, rabbit_probe: RabbitProbe) -> None:
    """Every pipeline log line of a message carries its message_id, correlation_id and queue; no password leaks."""
    mid = await rabbit_probe.publish("email", json.dumps(EMAIL).encode(), correlation_id="corr-log")
    await rabbit_probe.wait_event(names.EMAIL_SENT, mid)
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("message_id") == mid and line.get("logger", "").startswith("pipeline")]
    assert mine, "the handling left log lines"
    for line in mine:
        assert line["correlation_id"] == "corr-log"
        assert line["queue"] == "email"
    assert "guest:guest" not in worker.log()
