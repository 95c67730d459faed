"""Bad input against a real worker process on private RabbitMQ and Redis (hypothesis, seeded).

`CHAOS_FUZZ_EXAMPLES` (default 300) examples, derandomized with `CHAOS_SEED`: each is published
to a random queue or stream with random content type and forged headers, and must come out
as one `invalid` dead letter with its bytes intact, both in the broker's `<queue>.dlq` and in
the `dead_letters` table. The worker process must never die, and valid commands sent after the
whole run (and between examples) are still handled.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from streams.core import names
from tests.chaos.infra import fresh_postgres, plain_pg
from tests.connected.conftest import start_worker, wait_ready, wait_until
from tests.connected.rabbitserver import RabbitServer
from tests.connected.redisserver import RedisServer
from tests.unit.test_bad_input_fuzz import CONTENT_TYPES, FORGED_ATTEMPTS, bodies, is_valid, valid_body

EXAMPLES = int(os.environ.get("CHAOS_FUZZ_EXAMPLES", "300"))
TARGETS = [(b, q) for b in ("rabbit", "redis") for q in (names.EMAIL_QUEUE, names.COMPLETION_QUEUE)]


@st.composite
def examples(draw: st.DrawFn) -> dict[str, Any]:
    broker, queue = draw(st.sampled_from(TARGETS))
    body = draw(bodies(queue) | st.just(b"") | st.binary(min_size=1_000, max_size=20_000))
    if is_valid(queue, body):
        body = b"\x00" + body
    return {
        "broker": broker,
        "queue": queue,
        "body": body,
        "content_type": draw(st.sampled_from(["application/json", *CONTENT_TYPES[:-1]])),
        "attempts": draw(st.none() | st.sampled_from(FORGED_ATTEMPTS)),
        "plain_fields": broker == "redis" and draw(st.integers(0, 9)) == 0,  # a non-FastStream entry
    }


class Client:
    def __init__(self, rabbit_url: str, redis_url: str) -> None:
        self.rabbit_url = rabbit_url
        self.redis_url = redis_url
        self.conn: Any = None
        self.exchange: Any = None
        self.redis: Any = None

    async def open(self) -> None:
        self.conn = await aio_pika.connect(self.rabbit_url)
        channel = await self.conn.channel(publisher_confirms=True)
        self.exchange = await channel.get_exchange(names.TASKS_EXCHANGE)
        self.redis = aioredis.from_url(self.redis_url)

    async def close(self) -> None:
        await self.conn.close()
        await self.redis.aclose()

    async def publish(self, ex: dict[str, Any], mid: str) -> None:
        headers = {names.H_ATTEMPTS: ex["attempts"]} if ex["attempts"] is not None else {}
        if ex["broker"] == "rabbit":
            await self.exchange.publish(
                aio_pika.Message(
                    ex["body"], message_id=mid, content_type=ex["content_type"] or None, headers=headers,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=ex["queue"],
            )  # fmt: skip
        elif ex["plain_fields"]:
            await self.redis.xadd(ex["queue"], {"message-id": mid, "payload": ex["body"] or b"-"})
        else:
            envelope = await BinaryMessageFormatV1.encode(
                message=ex["body"],
                reply_to=None,
                headers={names.H_MESSAGE_ID: mid, "content-type": ex["content_type"], **headers},
                correlation_id=mid,
            )
            await self.redis.xadd(ex["queue"], {"__data__": envelope})


async def test_bad_input_against_a_real_worker(seed: int, servers_installed: None, tmp_path: Path) -> None:
    with RabbitServer() as rabbit, RedisServer("--appendonly", "yes", "--appendfsync", "always") as redis:
        async with fresh_postgres("chaos_fuzz") as db_url:
            await _fuzz(seed, rabbit, redis, db_url, tmp_path)


async def _fuzz(run_seed: int, rabbit: RabbitServer, redis: RedisServer, db_url: str, tmp: Path) -> None:
    env = {"PIPELINE_RABBIT_URL": rabbit.url, "PIPELINE_REDIS_URL": redis.url, "PIPELINE_DATABASE_URL": db_url}
    worker = start_worker(tmp, env, name="fuzz")
    loop = asyncio.get_running_loop()
    client = Client(rabbit.url, redis.url)
    db = None
    sent: dict[str, dict[str, Any]] = {}
    try:
        await wait_ready(worker, timeout=90)
        pid = worker.proc.pid
        await client.open()
        db = await asyncpg.connect(plain_pg(db_url))

        async def one(ex: dict[str, Any]) -> None:
            mid = f"fuzz-{uuid.uuid4()}"
            sent[mid] = ex
            await client.publish(ex, mid)

            async def parked() -> Any:
                assert worker.proc.poll() is None, f"the worker died:\n{worker.log()[-3000:]}"
                return await db.fetchrow("SELECT kind, body, attempts FROM dead_letters WHERE message_id = $1", mid)

            row = await wait_until(parked, 30, interval=0.05)
            assert row["kind"] == "invalid", dict(row)
            assert row["attempts"] == 1
            if not ex["plain_fields"]:
                assert bytes(row["body"]) == ex["body"], "bytes intact"

        # Hypothesis runs synchronously; each example runs on this loop from a worker thread.
        @seed(run_seed)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )
        @given(ex=examples())
        def check(ex: dict[str, Any]) -> None:
            asyncio.run_coroutine_threadsafe(one(ex), loop).result(timeout=60)

        await asyncio.to_thread(check)
        assert worker.proc.poll() is None, "the worker never crashed"
        assert worker.proc.pid == pid
        await _valid_still_handled(client, db)
        await _broker_dead_letters_match(rabbit, redis, sent)
        print(f"fuzzed {len(sent)} bad messages against a real worker (seed {run_seed}); all parked as invalid")
    finally:
        if db is not None:
            await db.close()
        if client.conn is not None:
            await client.close()
        worker.stop()


async def _valid_still_handled(client: Client, db: Any) -> None:
    mids = {}
    for broker, queue in TARGETS:
        mid = f"good-{uuid.uuid4()}"
        ex = {"broker": broker, "queue": queue, "body": valid_body(queue), "content_type": "application/json",
              "attempts": None, "plain_fields": False}  # fmt: skip
        await client.publish(ex, mid)
        mids[mid] = queue

    async def handled() -> bool:
        rows = await db.fetch("SELECT message_id FROM inbox WHERE message_id = ANY($1::text[])", list(mids))
        return len(rows) == len(mids)

    await wait_until(handled, 60, interval=0.2)


async def _broker_dead_letters_match(rabbit: RabbitServer, redis: RedisServer, sent: dict[str, dict[str, Any]]) -> None:
    found: dict[str, tuple[str, bytes]] = {}
    conn = await aio_pika.connect(rabbit.url)
    try:
        channel = await conn.channel()
        for queue_name in (names.EMAIL_QUEUE, names.COMPLETION_QUEUE):
            queue = await channel.declare_queue(names.dlq(queue_name), passive=True)
            while (msg := await queue.get(no_ack=True, fail=False)) is not None:
                kind = (msg.headers or {}).get(names.H_FAILURE_KIND)
                found[str(msg.message_id)] = (kind.decode() if isinstance(kind, bytes) else str(kind), bytes(msg.body))
    finally:
        await conn.close()
    client: Any = aioredis.from_url(redis.url)
    try:
        for stream in (names.EMAIL_STREAM, names.COMPLETION_STREAM):
            for _eid, fields in await client.xrange(names.dlq(stream)):
                mid = fields.get(names.H_MESSAGE_ID.encode(), b"").decode()
                body = BinaryMessageFormatV1.parse(fields[b"__data__"])[0] if b"__data__" in fields else b""
                found[mid] = (fields[names.H_FAILURE_KIND.encode()].decode(), body)
    finally:
        await client.aclose()
    missing = [m for m in sent if m not in found]
    assert missing == [], f"{len(missing)} bad messages not in the broker DLQs: {missing[:5]}"
    wrong = {m: k for m, (k, _) in found.items() if m in sent and k != "invalid"}
    assert wrong == {}
    changed = [m for m, ex in sent.items() if not ex["plain_fields"] and found[m][1] != ex["body"]]
    assert changed == [], (
        f"bodies changed in the DLQ: {changed[:5]} {json.dumps([sent[m]['broker'] for m in changed[:5]])}"
    )
