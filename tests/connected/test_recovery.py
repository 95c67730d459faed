"""Recoverability against the real brokers: broker-held retries, dead letters, restarts, kills, poison.

Each test runs its own worker process(es) with an HTTP mailer pointed at a scripted local server,
scripted per message id (`Idempotency-Key`), so stray messages cannot disturb a test.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import uuid
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from streams.core import names
from tests.connected.conftest import RedisProbe, wait_until
from tests.connected.harness import Bus, Workers, email
from tests.connected.redisserver import RedisServer
from tests.httpserver import RecordingServer, ScriptedResponse

FAILURE_HEADERS = names.DEAD_LETTER_HEADERS


async def test_503_twice_then_200_delivers_on_attempt_3_with_measured_backoff(
    bus: Bus, workers: Workers, mail_server: RecordingServer, record_property: Any
) -> None:
    """503, 503, 200: delivered on attempt 3, gaps follow 1 s then 2 s, exactly one `email.sent`."""
    await workers.start()
    mid = str(uuid.uuid4())
    mail_server.script_for(mid, 503, 503, ScriptedResponse(200, {"id": "sent-1"}))
    await bus.send("email", email(), mid)
    event = await bus.event(names.EMAIL_SENT, mid)
    assert event["provider_id"] == "sent-1"
    calls = mail_server.requests_for(mid)
    assert len(calls) == 3
    gaps = [round(b.received_at - a.received_at, 3) for a, b in itertools.pairwise(calls)]
    record_property("retry_gaps_seconds", gaps)
    print(f"{bus.broker} measured retry gaps: {gaps}")
    # Configured: 1 s after attempt 1, 2 s after attempt 2 (no jitter). RabbitMQ rounds a delay
    # up to whole seconds; the Redis mover runs every 50 ms; both add the time to deliver.
    assert 0.95 <= gaps[0] <= 1.8, gaps
    assert 1.95 <= gaps[1] <= 2.8, gaps
    assert await workers.event_types(f"email-{mid}") == [
        "message.retry_scheduled",
        "message.retry_scheduled",
        names.EMAIL_SENT,
    ]


async def test_always_failing_mailer_ends_in_dlq_after_exactly_max_attempts(
    bus: Bus, workers: Workers, mail_server: RecordingServer
) -> None:
    """Always 503: after exactly max attempts the DLQ holds it with every header, plus `email.failed`."""
    await workers.start(PIPELINE_RETRY_MAX_ATTEMPTS="3")
    mid = str(uuid.uuid4())
    mail_server.script_for(mid, 503)
    body = email("always failing")
    await bus.send("email", body, mid)
    headers, dead_body = await bus.dead_letter("email", mid)
    assert dead_body == body
    for key in FAILURE_HEADERS:
        assert headers.get(key), key
    assert headers[names.H_FAILURE_KIND] == "exhausted"
    assert headers[names.H_ATTEMPTS] == "3"
    assert headers[names.H_EXCEPTION_TYPE] == "handlers.errors.DependencyUnavailableError"
    assert headers[names.H_FIRST_FAILURE_AT] < headers[names.H_LAST_FAILURE_AT]
    assert len(mail_server.requests_for(mid)) == 3
    failed = await bus.event(names.EMAIL_FAILED, mid)
    assert failed["failure_kind"] == "exhausted"
    dead = await bus.event(names.MESSAGE_DEAD_LETTERED, mid)
    assert dead["attempts"] == 3
    rows = await workers.rows("SELECT kind, attempts FROM dead_letters WHERE message_id = :m", m=mid)
    assert rows == [("exhausted", 3)], "the dead letter is stored for review"


@pytest.mark.parametrize("status", [400, 422])
async def test_fatal_4xx_is_dead_lettered_on_the_first_attempt(
    bus: Bus, workers: Workers, mail_server: RecordingServer, status: int
) -> None:
    """A provider's 4xx is fatal: one attempt, DLQ kind `fatal`, `email.failed`, `message.dead_lettered`."""
    await workers.start()
    mid = str(uuid.uuid4())
    mail_server.script_for(mid, ScriptedResponse(status, {"error": "rejected"}))
    await bus.send("email", email(), mid)
    headers, _ = await bus.dead_letter("email", mid)
    assert headers[names.H_FAILURE_KIND] == "fatal"
    assert headers[names.H_ATTEMPTS] == "1"
    assert (await bus.event(names.EMAIL_FAILED, mid))["failure_kind"] == "fatal"
    await bus.event(names.MESSAGE_DEAD_LETTERED, mid)
    assert len(mail_server.requests_for(mid)) == 1


async def test_invalid_message_is_dead_lettered_on_the_first_attempt(bus: Bus, workers: Workers) -> None:
    """Schema-invalid input is never retried: DLQ kind `invalid`, attempt 1, bytes intact."""
    await workers.start()
    raw = b'{"to": "nobody", "subject": "x"}'
    mid = await bus.send("email", raw)
    headers, body = await bus.dead_letter("email", mid)
    assert (headers[names.H_FAILURE_KIND], headers[names.H_ATTEMPTS]) == ("invalid", "1")
    assert body == raw


async def test_worker_stopped_during_retry_delay_still_delivers_after_restart(
    bus: Bus, workers: Workers, mail_server: RecordingServer
) -> None:
    """The delay is held by the broker: stop the only worker while waiting, start another, it delivers."""
    first = await workers.start(PIPELINE_RETRY_BASE_DELAY="3", PIPELINE_RETRY_MAX_DELAY="3")
    mid = str(uuid.uuid4())
    mail_server.script_for(mid, 503, ScriptedResponse(200, {"id": "late"}))
    await bus.send("email", email(), mid)
    await asyncio.to_thread(mail_server.wait_for_requests, 1, 20)
    assert first.stop() in (0, -signal.SIGTERM)
    await workers.start(PIPELINE_RETRY_BASE_DELAY="3", PIPELINE_RETRY_MAX_DELAY="3")
    event = await bus.event(names.EMAIL_SENT, mid)
    assert event["provider_id"] == "late"
    assert len(mail_server.requests_for(mid)) == 2


async def test_sigkill_mid_message_redelivers_it(bus: Bus, workers: Workers, mail_server: RecordingServer) -> None:
    """A worker killed (SIGKILL) inside the handler loses nothing: the next worker gets the message again."""
    victim = await workers.start()
    mid = str(uuid.uuid4())
    mail_server.script_for(
        mid, ScriptedResponse(200, {"id": "never"}, delay=60), ScriptedResponse(200, {"id": "again"})
    )
    await bus.send("email", email(), mid)
    await wait_until(lambda: _has_requests(mail_server, mid, 1), 20)
    victim.stop(signal.SIGKILL)
    await workers.start()
    event = await bus.event(names.EMAIL_SENT, mid)
    assert event["provider_id"] == "again"


async def test_message_that_kills_its_worker_every_time_ends_as_poison(bus: Bus, workers: Workers) -> None:
    """A message that SIGKILLs every worker that takes it is redelivered up to the limit, then parked as poison."""
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    crashy = {"PIPELINE_FAULT_CRASH_MARKER": marker, "PIPELINE_DELIVERY_LIMIT": "2"}
    body = email(marker)
    mid = await bus.send("email", body)
    deaths = 0

    async def parked() -> tuple[dict[str, str], bytes] | None:
        nonlocal deaths
        alive = [w for w in workers.started if w.proc.poll() is None]
        if not alive:
            if deaths > 6:
                raise AssertionError("still crashing after 6 restarts: the poison cap did not hold")
            deaths += 1
            await workers.start(ready=False, **crashy)  # it may die before it is ready
        try:
            return await bus.dead_letter("email", mid, timeout=0.5)
        except AssertionError:
            return None

    await workers.start(ready=False, **crashy)
    headers, dead_body = await wait_until(parked, 90, interval=0.2)
    assert headers[names.H_FAILURE_KIND] == "poison"
    assert dead_body == body
    assert deaths >= 2, "it was redelivered after each crash before being parked"
    await bus.event(names.MESSAGE_DEAD_LETTERED, mid)


async def test_neighbours_of_a_poison_message_are_handled_not_parked(bus: Bus, workers: Workers) -> None:
    """Twenty messages that shared a window with a worker-killing one are redelivered with it, and handled."""
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    crashy = {
        "PIPELINE_FAULT_CRASH_MARKER": marker,
        "PIPELINE_DELIVERY_LIMIT": "2",
        "PIPELINE_RABBIT_PREFETCH": "32",
        "PIPELINE_REDIS_READ_COUNT": "32",
        "PIPELINE_REDIS_CLAIM_IDLE_MS": "1000",
    }
    poison = await bus.send("email", email(marker))
    innocent = [await bus.send("email", email()) for _ in range(20)]
    deaths = 0

    async def all_done() -> bool:
        nonlocal deaths
        if not [w for w in workers.started if w.proc.poll() is None]:
            if deaths > 6:
                raise AssertionError("still crashing after 6 restarts")
            deaths += 1
            await workers.start(ready=False, **crashy)
        try:
            parked = await workers.rows("SELECT message_id, kind FROM dead_letters")
            sent = await workers.rows("SELECT count(*) FROM inbox WHERE consumer = 'email'")
        except OperationalError:  # the first worker has not created the store yet
            return False
        return bool(parked) and sent[0][0] == len(innocent)

    await workers.start(ready=False, **crashy)
    await wait_until(all_done, 120, interval=0.3)
    assert deaths >= 1, "the poison message killed its worker"
    assert await workers.rows("SELECT message_id, kind FROM dead_letters") == [(poison, "poison")]
    for mid in innocent:
        await bus.event(names.EMAIL_SENT, mid)
    headers, _ = await bus.dead_letter("email", poison)
    assert headers[names.H_FAILURE_KIND] == "poison"


async def test_redis_pending_entries_of_a_dead_consumer_are_reclaimed(
    redis_probe: RedisProbe, workers: Workers, mail_server: RecordingServer
) -> None:
    """Entries pending on a killed Redis consumer are claimed (XAUTOCLAIM) by another and handled."""
    victim = await workers.start()
    mids = [str(uuid.uuid4()) for _ in range(3)]
    for mid in mids:
        mail_server.script_for(mid, ScriptedResponse(200, {"id": "stuck"}, delay=60), ScriptedResponse(200))
        await redis_probe.publish("email", email(), message_id=mid)
    await wait_until(lambda: _all_requested(mail_server, mids), 20)
    victim.stop(signal.SIGKILL)
    await workers.start()
    for mid in mids:
        await redis_probe.wait_event(names.EMAIL_SENT, mid, timeout=30)

    async def nothing_pending() -> bool:
        summary = await redis_probe.client.xpending("email", names.EMAIL_GROUP)
        return int(summary["pending"]) == 0

    await wait_until(nothing_pending, 15)


async def _has_requests(server: RecordingServer, mid: str, count: int) -> bool:
    return len(server.requests_for(mid)) >= count


async def _all_requested(server: RecordingServer, mids: list[str]) -> bool:
    return all(server.requests_for(mid) for mid in mids)


async def test_redis_restart_that_loses_the_group_is_survived(workers: Workers) -> None:
    """A Redis restart without persistence drops every group: the worker re-creates it and keeps consuming."""
    import redis.asyncio as aioredis

    with RedisServer() as server:
        worker = await workers.start(PIPELINE_REDIS_URL=server.url)
        client = aioredis.from_url(server.url)
        probe = RedisProbe(client)
        try:
            await probe.start()
            before = await probe.publish("email", email())
            await probe.wait_event(names.EMAIL_SENT, before)
            await asyncio.to_thread(server.restart)
            await client.aclose()
            client = aioredis.from_url(server.url)
            probe = RedisProbe(client)
            probe.events_from = b"0-0"
            after = await probe.publish("email", email())  # XADD recreates the stream, not the group
            await probe.wait_event(names.EMAIL_SENT, after, timeout=30)
            assert worker.proc.poll() is None, "the worker did not exit"
            groups = {g["name"] for g in await client.xinfo_groups("email")}
            assert names.EMAIL_GROUP.encode() in groups
            assert "re-created it" in worker.log(), "the group was lost and re-created, not merely waited for"
        finally:
            await client.aclose()
