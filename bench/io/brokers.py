"""The brokers' side of `make bench-io`: empty queues, preloaded commands, dead letters counted (vhost `bench`)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aio_pika
import redis.asyncio as aioredis
from aiormq.exceptions import ChannelNotFoundEntity

from bench import pipeline, workload
from bench.io.config import DRAMATIQ_LIMITER_KEY

EMAIL = "email"
COMPLETION = "ai.completion"
TASKS = "tasks"
FASTSTREAM_QUEUE = "bench.io.faststream"
DRAMATIQ_QUEUE = "bench_io_dramatiq"
DELAY_QUEUES = tuple(f"delay.level.{level:02d}" for level in range(16))  # streams.transport.topology
LIMIT_KEYS = "pipeline:limits:*"  # streams.policy.limits.KEY_PREFIX, in the workers' Redis database


async def depth(rabbit_url: str, queue: str) -> int:
    """Messages ready in a queue (0 when it does not exist)."""
    conn = await aio_pika.connect(rabbit_url)
    try:
        ready, _ = await workload.queue_depth(await conn.channel(), queue)
        return ready
    finally:
        await conn.close()


async def _purge(channel: aio_pika.abc.AbstractChannel, name: str) -> None:
    try:
        queue = await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        await channel.reopen()
        return
    await queue.purge()


async def reset_pipeline(rabbit_url: str, redis_url: str) -> None:
    """The pipeline's topology declared; its command, dead-letter and delay queues empty (a retry held
    there by an earlier run would come back in this one); the shared limits forgotten in Redis."""
    await pipeline.declare_rabbit_topology(rabbit_url)
    conn = await aio_pika.connect(rabbit_url)
    try:
        channel = await conn.channel()
        for name in (EMAIL, COMPLETION):
            _, consumers = await workload.queue_depth(channel, name)
            if consumers:
                raise RuntimeError(f"queue {name} has {consumers} consumer(s): another worker runs on this vhost")
        for name in (EMAIL, f"{EMAIL}.dlq", COMPLETION, f"{COMPLETION}.dlq", *DELAY_QUEUES, pipeline.OUTCOME_PROBE):
            await _purge(channel, name)
    finally:
        await conn.close()
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=LIMIT_KEYS, count=1000)]
        keys.extend([k async for k in client.scan_iter(match=f"*{DRAMATIQ_LIMITER_KEY}*", count=1000)])
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def after_run(rabbit_url: str) -> None:
    """Drop what a capped run left: undelivered commands, held retries, outcomes in the main bench's probe."""
    conn = await aio_pika.connect(rabbit_url)
    try:
        channel = await conn.channel()
        for name in (EMAIL, COMPLETION, *DELAY_QUEUES, pipeline.OUTCOME_PROBE, FASTSTREAM_QUEUE):
            await _purge(channel, name)
        for name in (DRAMATIQ_QUEUE, f"{DRAMATIQ_QUEUE}.DQ", f"{DRAMATIQ_QUEUE}.XQ"):
            await _purge(channel, name)
    finally:
        await conn.close()


async def preload_emails(rabbit_url: str, n: int, prefix: str) -> None:
    """n `SendEmail` commands on `tasks`/`email` (each its own message id: the Idempotency-Key)."""
    ids = workload.message_ids(prefix, n)
    await workload.publish_many(rabbit_url, TASKS, EMAIL, ((next(ids), workload.email_body(i)) for i in range(n)))
    await workload.wait_depth(rabbit_url, EMAIL, n)


def completion_body(i: int, prompt_chars: int) -> bytes:
    """The i-th `RequestCompletion`: a prompt of exactly `prompt_chars` characters."""
    text = f"Summarise support ticket #{i} in one line for the on-call engineer. "
    prompt = (text * (prompt_chars // len(text) + 1))[:prompt_chars]
    return json.dumps({"task_id": f"bench-{i}", "prompt": prompt, "model": "gpt-sim"}).encode()


async def preload_completions(rabbit_url: str, n: int, prompt_chars: int, prefix: str) -> None:
    """n `RequestCompletion` commands on `tasks`/`ai.completion`."""
    ids = workload.message_ids(prefix, n)
    bodies = ((next(ids), completion_body(i, prompt_chars)) for i in range(n))
    await workload.publish_many(rabbit_url, TASKS, COMPLETION, bodies)
    await workload.wait_depth(rabbit_url, COMPLETION, n)


async def preload_faststream(rabbit_url: str, n: int) -> None:
    """The bare FastStream contender's own quorum queue with n commands."""
    await workload.preload_rabbit_queue(rabbit_url, FASTSTREAM_QUEUE, n, "quorum")


async def preload_dramatiq(rabbit_url: str, n: int) -> None:
    """Dramatiq's queues declared by Dramatiq, then n of its messages (the same fields, its envelope)."""
    from bench.io.contenders import dramatiq_http  # noqa: PLC0415 - Dramatiq is a bench extra: imported when used

    await asyncio.to_thread(dramatiq_http.declare, rabbit_url, DRAMATIQ_QUEUE)
    ids = list(workload.message_ids("dramatiq", n))
    bodies = ((ids[i], dramatiq_http.encode(DRAMATIQ_QUEUE, workload.email_payload(i), ids[i])) for i in range(n))
    await workload.publish_many(rabbit_url, "", DRAMATIQ_QUEUE, bodies)
    await workload.wait_depth(rabbit_url, DRAMATIQ_QUEUE, n)


async def dead_letters(rabbit_url: str, queue: str) -> int:
    """Dead letters of a contender: `<queue>.dlq` (pipeline) or `<queue>.XQ` (Dramatiq)."""
    with contextlib.suppress(Exception):
        return await depth(rabbit_url, queue)
    return -1
