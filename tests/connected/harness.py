"""Test harness for connected tests: a broker seen from outside, and worker processes sharing a store."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faststream.redis.parser.binary import BinaryMessageFormatV1
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from streams.core import names
from tests.connected.conftest import RabbitProbe, RedisProbe, Worker, start_worker, wait_ready

FAST_RETRY = {
    "PIPELINE_RETRY_BASE_DELAY": "1",
    "PIPELINE_RETRY_MAX_DELAY": "4",
    "PIPELINE_RETRY_JITTER": "none",
    "PIPELINE_REDIS_MOVER_INTERVAL_MS": "50",
    "PIPELINE_REDIS_CLAIM_IDLE_MS": "1500",
    "PIPELINE_OUTBOX_ORPHAN_SECONDS": "2",
}


def email(subject: str = "Welcome") -> bytes:
    """A valid SendEmail body."""
    return json.dumps({"to": "ada@example.com", "subject": subject, "body": "Hello Ada"}).encode()


@dataclass
class Bus:
    """One broker seen from outside: publish a command, await its events and its dead letter."""

    broker: str
    rabbit: RabbitProbe
    redis: RedisProbe

    async def send(self, queue: str, body: bytes, message_id: str | None = None) -> str:
        mid = message_id or str(uuid.uuid4())
        if self.broker == "rabbit":
            return await self.rabbit.publish(queue, body, message_id=mid)
        return await self.redis.publish(queue, body, message_id=mid)

    async def event(self, event_type: str, mid: str, timeout: float = 30) -> dict[str, Any]:
        if self.broker == "rabbit":
            body, _ = await self.rabbit.wait_event(event_type, mid, timeout)
            return body
        return await self.redis.wait_event(event_type, mid, timeout)

    async def dead_letter(self, queue: str, mid: str, timeout: float = 30) -> tuple[dict[str, str], bytes]:
        """Headers (as text) and body of the dead letter of `mid`."""
        if self.broker == "rabbit":
            msg = await self.rabbit.take_dead_letter(names.dlq(queue), mid, timeout)
            headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in msg.headers.items()}
            return headers, bytes(msg.body)
        fields = await self.redis.dead_letter(names.dlq(queue), mid, timeout)
        body, _ = BinaryMessageFormatV1.parse(fields[b"__data__"])
        return {k.decode(): v.decode() for k, v in fields.items() if k != b"__data__"}, body


class Workers:
    """Starts workers sharing one SQLite store and one mailer; stops them all afterwards."""

    def __init__(self, tmp: Path, mailer_url: str, db_url: str | None = None) -> None:
        self.tmp = tmp
        self.mailer_url = mailer_url
        self.started: list[Worker] = []
        self.db_url = db_url or f"sqlite+aiosqlite:///{tmp / 'store.db'}"

    async def start(self, *, ready: bool = True, **extra: str) -> Worker:
        # One store for every worker of a test, like several workers on one PostgreSQL.
        env = {
            "PIPELINE_MAILER": "http",
            "PIPELINE_MAILER_URL": self.mailer_url,
            "PIPELINE_DATABASE_URL": self.db_url,
            **FAST_RETRY,
            **extra,
        }
        worker = start_worker(self.tmp, env, name=f"w{len(self.started)}")
        self.started.append(worker)
        if ready:
            await wait_ready(worker)
        return worker

    async def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Run a read query against the workers' store (SQLite or PostgreSQL)."""
        engine = create_async_engine(self.db_url)
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(text(sql), params)).all()]
        finally:
            await engine.dispose()

    async def event_types(self, stream_id: str) -> list[str]:
        """The types of a store stream's events, in version order."""
        rows = await self.rows("SELECT type FROM events WHERE stream_id = :s ORDER BY version", s=stream_id)
        return [r[0] for r in rows]

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop(timeout=15)
