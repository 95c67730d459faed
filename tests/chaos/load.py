"""The load side of a chaos run: commands, a publisher with a ledger of confirmed publishes, an observer.

The ledger holds only what a broker confirmed: a RabbitMQ publisher confirm (the channel runs in
confirm mode and `mandatory` routing, so an unroutable message is an error, not a silent drop), or
the entry id a Redis XADD returned (Redis runs `appendonly yes`, `appendfsync always`). A publish
that fails is retried with the same message id until confirmed; the first try may have landed, so
the pipeline may see that id twice, which its inbox must absorb.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from redis.exceptions import RedisError

from streams.core import names

FLOW_QUEUE = {"email": names.EMAIL_QUEUE, "completion": names.COMPLETION_QUEUE}
SUCCESS = {"email": names.EMAIL_SENT, "completion": names.COMPLETION_SUCCEEDED}
FAILED = {"email": names.EMAIL_FAILED, "completion": names.COMPLETION_FAILED}
TERMINAL = frozenset({*SUCCESS.values(), *FAILED.values(), names.MESSAGE_DEAD_LETTERED})


@dataclass(frozen=True)
class Command:
    """One command of the run: unique id, broker, flow, and what it is for."""

    mid: str
    broker: str  # rabbit | redis
    flow: str  # email | completion
    kind: str  # normal | poison | named:<crash point>
    body: bytes

    @property
    def queue(self) -> str:
        return FLOW_QUEUE[self.flow]


def make_command(rng: random.Random, index: int, run: str, kind: str, marker: str = "") -> Command:
    """A valid command; `marker` (the crash marker) goes into the subject or the prompt."""
    broker = rng.choice(("rabbit", "redis"))
    flow = rng.choice(("email", "completion"))
    mid = f"{run}-{index:06d}"
    text = f"chaos {index} {marker}".strip()
    if flow == "email":
        body = {"to": f"user{index}@example.com", "subject": text, "body": f"Hello number {index}"}
    else:
        body = {"task_id": f"task-{mid}", "prompt": text, "model": "echo"}
    return Command(mid, broker, flow, kind, json.dumps(body).encode())


@dataclass
class Published:
    command: Command
    confirmed_at: float  # seconds since the run's t0
    tries: int


class Publisher:
    """Publishes commands to both brokers; `ledger` is every confirmed publish."""

    def __init__(self, rabbit_url: str, redis_url: str, t0: float) -> None:
        self.rabbit_url = rabbit_url
        self.redis_url = redis_url
        self.t0 = t0
        self.ledger: dict[str, Published] = {}
        self.failed_tries: list[dict[str, Any]] = []  # publishes that raised (then retried)
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._redis: Any = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._conn = await aio_pika.connect_robust(self.rabbit_url)
        channel = await self._conn.channel(publisher_confirms=True)
        self._exchange = await channel.get_exchange(names.TASKS_EXCHANGE, ensure=True)
        self._redis = aioredis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def _rabbit(self, cmd: Command) -> None:
        assert self._exchange is not None
        message = aio_pika.Message(
            cmd.body,
            message_id=cmd.mid,
            correlation_id=cmd.mid,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=time.time(),
        )
        await asyncio.wait_for(self._exchange.publish(message, routing_key=cmd.queue, mandatory=True), 10)

    async def _redis_add(self, cmd: Command) -> None:
        envelope = await BinaryMessageFormatV1.encode(
            message=cmd.body,
            reply_to=None,
            headers={names.H_MESSAGE_ID: cmd.mid, "content-type": "application/json"},
            correlation_id=cmd.mid,
        )
        entry_id = await self._redis.xadd(cmd.queue, {"__data__": envelope})
        assert entry_id, "XADD returned no id"

    async def publish(self, cmd: Command, deadline: float = 180.0) -> None:
        """Publish until confirmed (same id each try); raises when not confirmed by the deadline."""
        give_up = time.monotonic() + deadline
        tries = 0
        while True:
            tries += 1
            try:
                if cmd.broker == "rabbit":
                    await self._rabbit(cmd)
                else:
                    await self._redis_add(cmd)
                break
            except (aio_pika.exceptions.AMQPError, RedisError, OSError, TimeoutError, RuntimeError) as exc:
                self.failed_tries.append(
                    {
                        "t": round(time.monotonic() - self.t0, 3),
                        "mid": cmd.mid,
                        "broker": cmd.broker,
                        "error": repr(exc),
                    }
                )
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.5)
        self.ledger[cmd.mid] = Published(cmd, round(time.monotonic() - self.t0, 3), tries)


@dataclass
class Seen:
    event_id: str
    type: str
    message_id: str
    broker: str
    t: float
    body: dict[str, Any]


@dataclass
class Observer:
    """Reads every outcome event: a durable probe queue on exchange `events`, and stream `events`."""

    rabbit_url: str
    redis_url: str
    t0: float
    events: dict[str, Seen] = field(default_factory=dict)  # by event_id (deduped)
    copies: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # event_id -> times received
    by_message: dict[str, list[Seen]] = field(default_factory=lambda: defaultdict(list))
    last_event_at: float = 0.0
    probe_queue: str = "chaos-probe"
    _conn: Any = None
    errors: list[str] = field(default_factory=list)

    wall0: float = 0.0
    _redis_last: bytes = b"0-0"

    def _record(self, broker: str, event_type: str, payload: bytes) -> None:
        body = json.loads(payload)
        event_id = body["event_id"]
        self.copies[event_id] += 1
        now = round(time.monotonic() - self.t0, 3)
        self.last_event_at = now
        if event_id in self.events:
            return
        # When it happened (the worker's clock), relative to the run: throughput is measured on it.
        occurred = datetime.fromisoformat(body["occurred_at"]).timestamp() - self.wall0
        seen = Seen(event_id, event_type, body.get("message_id", ""), broker, round(occurred, 3), body)
        self.events[event_id] = seen
        self.by_message[seen.message_id].append(seen)

    async def declare(self) -> None:
        """The probe queue, bound before any worker publishes (durable: it outlives a broker restart)."""
        conn = await aio_pika.connect(self.rabbit_url)
        channel = await conn.channel()
        exchange = await channel.declare_exchange(names.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(self.probe_queue, durable=True)
        await queue.bind(exchange, routing_key="#")
        await conn.close()

    async def start(self) -> None:
        """Nothing runs in the background: `poll()` drains the durable probe queue and the stream."""

    async def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def poll(self) -> int:
        """Read every outcome event published since the last poll, on both brokers; returns how many."""
        got = 0
        try:
            if self._conn is None or self._conn.is_closed:
                self._conn = await aio_pika.connect(self.rabbit_url)
            channel = await self._conn.channel()
            queue = await channel.declare_queue(self.probe_queue, durable=True, passive=True)
            while (msg := await queue.get(no_ack=True, fail=False)) is not None:
                got += 1
                try:
                    self._record("rabbit", msg.routing_key or "", msg.body)
                except (ValueError, KeyError) as exc:
                    self.errors.append(f"unreadable rabbit event: {exc!r}")
            await channel.close()
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError):
            self._conn = None  # the broker is restarting: the durable queue keeps the events
        client: Any = aioredis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=2)
        try:
            while True:
                reply = await client.xread({names.EVENTS_STREAM: self._redis_last}, count=5000)
                if not reply:
                    break
                for _stream, entries in reply:
                    for entry_id, fields in entries:
                        self._redis_last = entry_id
                        got += 1
                        try:
                            body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
                            self._record("redis", str(headers.get(names.H_EVENT_TYPE, "")), body)
                        except (ValueError, KeyError) as exc:
                            self.errors.append(f"unreadable redis event: {exc!r}")
        except (RedisError, OSError):
            pass
        finally:
            await client.aclose()
        return got

    def terminal(self, mid: str) -> list[Seen]:
        return [s for s in self.by_message.get(mid, []) if s.type in TERMINAL]

    def rates(self, until: float, bucket: float = 1.0) -> list[int]:
        """Terminal outcomes first seen per `bucket` seconds from t0 to `until`."""
        counts = [0] * (int(until / bucket) + 1)
        for seen in self.events.values():
            if seen.type in TERMINAL and seen.t <= until:
                counts[int(seen.t / bucket)] += 1
        return counts
