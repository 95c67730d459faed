"""Contract tests of the event store port and its outbox relay, run against SQLite and PostgreSQL.

The builders below are shared by the test modules of this package: envelopes, events and
commits shaped the way the pipeline writes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import EmailSent, Event, FailureKind
from streams.core.envelope import Envelope, Transport
from streams.eventstore.store import Commit
from streams.eventstore.tables import email_log, task_status
from streams.policy.failures import Failure


def new_id(prefix: str = "m") -> str:
    """A unique message id, readable in failure output."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def envelope(
    message_id: str | None = None,
    *,
    transport: Transport = "rabbit",
    source: str = "email",
    attempt: int = 1,
    fields: dict[bytes, bytes] | None = None,
) -> Envelope:
    """A received message as the pipeline reads it."""
    mid = message_id or new_id()
    return Envelope(
        transport, source, mid, f"c-{mid}", b'{"to": "ada@example.com"}', {"tenant": "acme"}, attempt, fields=fields
    )


def email_sent(env: Envelope, **overrides: Any) -> EmailSent:
    """The success event of an e-mail command."""
    return EmailSent(
        message_id=env.message_id,
        correlation_id=env.correlation_id,
        to="ada@example.com",
        subject="Welcome",
        provider_id=f"p-{env.message_id}",
        **overrides,
    )


def sent(
    stream_id: str | None = None,
    *,
    env: Envelope | None = None,
    consumer: str | None = None,
    count: int = 1,
    publish: bool = True,
) -> Commit:
    """A commit of `count` EmailSent events (fresh event ids) for one message."""
    env = env or envelope()
    evs: Sequence[Event] = [email_sent(env) for _ in range(count)]
    return Commit(stream_id or f"email-{env.message_id}", evs, env, publish=publish, consumer=consumer)


def failure(kind: FailureKind = FailureKind.FATAL, attempts: int = 1) -> Failure:
    """A described failure, as the pipeline dead-letters it."""
    now = datetime.now(UTC)
    return Failure(kind, "handlers.errors.FatalError", "mailbox unavailable", "Traceback ...", attempts, now, now)


async def projection_rows(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    """Every row of the live projection tables, keyed and sorted, without `updated_at`."""
    found: dict[str, list[dict[str, Any]]] = {}
    async with engine.connect() as conn:
        for table, key in ((task_status, task_status.c.task_id), (email_log, email_log.c.message_id)):
            rows = (await conn.execute(select(table).order_by(key))).mappings().all()
            found[table.name] = [{k: v for k, v in r.items() if k != "updated_at"} for r in rows]
    return found
