"""The workload: small JSON `SendEmail` commands, preloaded into RabbitMQ queues and Redis streams."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import redis.asyncio as aioredis
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from faststream.redis.parser.binary import BinaryMessageFormatV1
from pamqp import commands as spec

REDIS_PIPE = 1_000  # XADDs per round trip while preloading


def email_payload(i: int) -> dict[str, Any]:
    """The i-th command's fields: a small, valid `SendEmail`."""
    return {"to": f"user{i}@example.com", "subject": f"Welcome #{i}", "body": "Hello, and welcome aboard."}


def email_body(i: int) -> bytes:
    """The i-th command as JSON bytes (about 90 bytes)."""
    return json.dumps(email_payload(i)).encode()


def message_ids(prefix: str, n: int) -> Iterator[str]:
    """Unique message ids (the pipeline's idempotency keys) for one run."""
    run = uuid.uuid4().hex[:12]
    for i in range(n):
        yield f"{prefix}-{run}-{i}"


# --- RabbitMQ -----------------------------------------------------------------------------------


def vhost_of(url: str) -> str:
    """The virtual host named by an AMQP URL (`/` when none)."""
    path = urlsplit(url).path
    return path[1:] if len(path) > 1 else "/"


async def ensure_vhost(url: str) -> str:
    """Connect to the URL's vhost, creating it with `rabbitmqctl` if it is missing; returns the URL to use.

    Falls back to the default vhost when the vhost cannot be created (no rabbitmqctl, no rights).
    """
    try:
        conn = await aio_pika.connect(url, timeout=5)
    except Exception as exc:
        vhost = vhost_of(url)
        if vhost == "/":
            raise
        if _create_vhost(vhost):
            return url
        fallback = url[: len(url) - len(urlsplit(url).path)] + "/"
        print(f"[bench] vhost {vhost!r} unavailable ({exc!r}); using the default vhost")
        return fallback
    await conn.close()
    return url


def _create_vhost(vhost: str) -> bool:
    try:
        subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


async def reset_queue(channel: aio_pika.abc.AbstractChannel, name: str, arguments: dict[str, Any]) -> None:
    """Make `name` an empty durable queue with exactly these arguments (re-created if they differ)."""
    try:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed:
        await channel.reopen()
        await channel.queue_delete(name)
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    await queue.purge()


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> tuple[int, int]:
    """Messages ready and consumers of a queue (passive declare)."""
    try:
        queue = await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        await channel.reopen()
        return 0, 0
    result = queue.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def publish_many(url: str, exchange: str, routing_key: str, bodies: Iterable[tuple[str, bytes]]) -> int:
    """Publish persistent messages (message id, body) as fast as one client can; returns the count.

    Plain aiormq without publisher confirms (the cheapest way a Python client has): callers check
    the queue depth afterwards instead (`wait_depth`).
    """
    conn = await aiormq.connect(url)
    count = 0
    try:
        channel = await conn.channel(publisher_confirms=False)
        for mid, body in bodies:
            props = spec.Basic.Properties(
                message_id=mid, correlation_id=mid, content_type="application/json", delivery_mode=2
            )
            await channel.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=props)
            count += 1
        await channel.close()  # a close answered by the broker: every publish before it was received
    finally:
        await conn.close()
    return count


async def wait_depth(url: str, queue: str, n: int, within: float = 60.0) -> None:
    """Until `queue` holds n ready messages; fails when it holds another number at the deadline."""
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        deadline = time.monotonic() + within
        while True:
            ready, _ = await queue_depth(channel, queue)
            if ready == n:
                return
            if ready > n or time.monotonic() > deadline:
                raise RuntimeError(f"queue {queue} holds {ready} messages after preloading {n}")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def queue_arguments(queue_type: str) -> dict[str, Any]:
    """Declaration arguments of a bare contender's queue."""
    return {"x-queue-type": queue_type}


async def preload_rabbit_queue(url: str, queue: str, n: int, queue_type: str) -> None:
    """An empty durable queue `queue`, then n commands in it via the default exchange."""
    conn = await aio_pika.connect(url)
    try:
        await reset_queue(await conn.channel(), queue, queue_arguments(queue_type))
    finally:
        await conn.close()
    ids = message_ids("bench", n)
    await publish_many(url, "", queue, ((next(ids), email_body(i)) for i in range(n)))
    await wait_depth(url, queue, n)


# --- Redis --------------------------------------------------------------------------------------


async def redis_entry(body: bytes, message_id: str) -> dict[str, bytes]:
    """A stream entry as a FastStream producer writes it: the binary envelope in field `__data__`."""
    envelope = await BinaryMessageFormatV1.encode(
        message=body,
        reply_to=None,
        headers={"message-id": message_id, "content-type": "application/json", "message_id": message_id},
        correlation_id=message_id,
    )
    return {"__data__": envelope}


async def preload_redis_stream(client: aioredis.Redis, stream: str, n: int, prefix: str = "bench") -> None:
    """Append n commands to `stream` (which the caller emptied), in pipelined batches."""
    ids = message_ids(prefix, n)
    for start in range(0, n, REDIS_PIPE):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + REDIS_PIPE, n)):
                pipe.xadd(stream, await redis_entry(email_body(i), next(ids)))  # type: ignore[arg-type]
            await pipe.execute()
    length = await client.xlen(stream)
    if length != n:
        raise RuntimeError(f"stream {stream} holds {length} entries after preloading {n}")


async def reset_redis_stream(client: aioredis.Redis, stream: str, group: str, n: int) -> None:
    """Stream `stream` with exactly n fresh commands and consumer group `group` reading from the start."""
    await client.delete(stream)
    await preload_redis_stream(client, stream, n)
    await client.xgroup_create(stream, group, id="0")
