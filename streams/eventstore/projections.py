"""Projections as folds over the event log: completion task status and the e-mail delivery log.

`evolve_*` are pure (state, event) -> state functions; `apply` folds a batch of freshly
appended events into the live tables inside the same transaction; `rebuild` folds the whole log
from scratch, so a rebuilt projection equals the live one by construction. `attempts` counts the
attempts made or scheduled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Text, bindparam, delete, select, type_coerce
from sqlalchemy.ext.asyncio import AsyncEngine

from streams.eventstore.sql import CoreStatements, Statements
from streams.eventstore.tables import email_log, events, task_status

TERMINAL_TASK = frozenset({"succeeded", "failed"})
TERMINAL_EMAIL = frozenset({"sent", "failed"})
REBUILD_CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event as the log holds it."""

    position: int
    stream_id: str
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TaskState:
    """One completion task."""

    task_id: str
    status: str
    attempts: int
    model: str | None
    result: str | None
    reason: str | None
    message_id: str | None
    position: int


@dataclass(frozen=True, slots=True)
class EmailState:
    """One e-mail command's delivery."""

    message_id: str
    recipient: str | None
    subject: str | None
    status: str
    attempts: int
    provider_id: str | None
    reason: str | None
    position: int


def evolve_task(state: TaskState | None, ev: Recorded) -> TaskState | None:
    """The task after one more event of its stream (`completion-<task_id>`)."""
    if not ev.stream_id.startswith("completion-"):
        return state
    task_id = ev.stream_id.removeprefix("completion-")
    s = state or TaskState(task_id, "requested", 0, None, None, None, None, ev.position)
    d = ev.data
    # One `replace` per event, not one per field: a rebuild makes one for every event of the log.
    moved: dict[str, Any] = {"position": ev.position, "message_id": d.get("message_id", s.message_id)}
    if ev.type == "completion.requested":
        return replace(s, **moved, model=d.get("model"), attempts=max(s.attempts, 1))
    if ev.type == "message.retry_scheduled":
        if s.status in TERMINAL_TASK:
            return replace(s, **moved)
        return replace(s, **moved, status="processing", attempts=max(s.attempts, int(d.get("attempt", 1)) + 1))
    if ev.type == "completion.succeeded":
        return replace(
            s,
            **moved,
            status="succeeded",
            result=d.get("completion"),
            model=d.get("model", s.model),
            reason=None,
            attempts=max(s.attempts, 1),
        )
    if ev.type == "completion.failed":
        return replace(s, **moved, status="failed", reason=d.get("reason"), model=d.get("model", s.model))
    if ev.type == "message.dead_lettered":
        status = s.status if s.status in TERMINAL_TASK else "dead-lettered"
        return replace(
            s,
            **moved,
            status=status,
            attempts=max(s.attempts, int(d.get("attempts", 0))),
            reason=s.reason or d.get("exception_message"),
        )
    return replace(s, **moved)


def evolve_email(state: EmailState | None, ev: Recorded) -> EmailState | None:
    """The delivery after one more event of its stream (`email-<message_id>`)."""
    if not ev.stream_id.startswith("email-"):
        return state
    s = state or EmailState(ev.stream_id.removeprefix("email-"), None, None, "pending", 0, None, None, ev.position)
    d = ev.data
    # Built field by field, not with `replace`, which would be the costliest step of the live fold.
    if ev.type == "email.sent":
        to, subject, provider_id = d.get("to"), d.get("subject"), d.get("provider_id")
        return EmailState(s.message_id, to, subject, "sent", max(s.attempts, 1), provider_id, None, ev.position)
    if ev.type == "email.failed":
        to, reason = d.get("to"), d.get("reason")
        return EmailState(s.message_id, to, s.subject, "failed", max(s.attempts, 1), s.provider_id, reason, ev.position)
    status, attempts, reason = s.status, s.attempts, s.reason
    if ev.type == "message.retry_scheduled" and status not in TERMINAL_EMAIL:
        status, attempts = "retrying", max(attempts, int(d.get("attempt", 1)) + 1)
    elif ev.type == "message.dead_lettered":
        status = status if status in TERMINAL_EMAIL else "dead-lettered"
        attempts, reason = max(attempts, int(d.get("attempts", 0))), reason or d.get("exception_message")
    return EmailState(s.message_id, s.recipient, s.subject, status, attempts, s.provider_id, reason, ev.position)


def fold(
    tasks: dict[str, TaskState], emails: dict[str, EmailState], batch: Iterable[Recorded]
) -> tuple[set[str], set[str]]:
    """Fold events into the states in place; returns the task ids and message ids that changed."""
    changed_tasks: set[str] = set()
    changed_emails: set[str] = set()
    for ev in batch:
        if ev.stream_id.startswith("completion-"):
            key = ev.stream_id.removeprefix("completion-")
            new_task = evolve_task(tasks.get(key), ev)
            if new_task is not None:
                tasks[key] = new_task
                changed_tasks.add(key)
        elif ev.stream_id.startswith("email-"):
            key = ev.stream_id.removeprefix("email-")
            new_email = evolve_email(emails.get(key), ev)
            if new_email is not None:
                emails[key] = new_email
                changed_emails.add(key)
    return changed_tasks, changed_emails


async def apply(sql: Statements, batch: Sequence[Recorded]) -> None:
    """Fold freshly appended events into the live projection tables (same transaction)."""
    task_ids = {e.stream_id.removeprefix("completion-") for e in batch if e.stream_id.startswith("completion-")}
    email_ids = {e.stream_id.removeprefix("email-") for e in batch if e.stream_id.startswith("email-")}
    tasks: dict[str, TaskState] = {}
    emails: dict[str, EmailState] = {}
    if task_ids:
        tasks = {r[0]: TaskState(*r) for r in await sql.by_key(task_status, task_ids, _TASK_FIELDS)}
    if email_ids:
        emails = {r[0]: EmailState(*r) for r in await sql.by_key(email_log, email_ids, _EMAIL_FIELDS)}
    stored_tasks, stored_emails = set(tasks), set(emails)  # rows to replace; the rest are new
    changed_tasks, changed_emails = fold(tasks, emails, batch)
    await _write(
        sql,
        {k: tasks[k] for k in changed_tasks},
        {k: emails[k] for k in changed_emails},
        replace=(stored_tasks & changed_tasks, stored_emails & changed_emails),
    )


async def rebuild(engine: AsyncEngine) -> tuple[int, int, int]:
    """Rebuild both projections from the whole log; returns (events read, tasks, e-mails)."""
    tasks: dict[str, TaskState] = {}
    emails: dict[str, EmailState] = {}
    seen = 0
    async with engine.connect() as conn:
        # The next chunk is read (in the driver: aiosqlite's thread, asyncpg's socket) while this
        # one is folded; SQLite's JSON text is parsed here with orjson, whatever the engine's deserializer.
        reading = asyncio.ensure_future(conn.execute(_REBUILD_CHUNK, {"after": 0}))
        try:
            while rows := (await reading).all():
                reading = asyncio.ensure_future(conn.execute(_REBUILD_CHUNK, {"after": rows[-1][0]}))
                fold(tasks, emails, [Recorded(r[0], r[1], r[2], _parsed(r[3])) for r in rows])
                seen += len(rows)
        finally:
            if not reading.done():  # a fold failed: let the read in flight finish before the connection closes
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
    async with engine.begin() as conn:
        await conn.execute(delete(task_status))
        await conn.execute(delete(email_log))
        await _write(CoreStatements(conn), tasks, emails)
    return seen, len(tasks), len(emails)


async def _write(
    sql: Statements,
    tasks: dict[str, TaskState],
    emails: dict[str, EmailState],
    *,
    replace: tuple[set[str], set[str]] = (set(), set()),
) -> None:
    """Insert these states, first deleting the stored rows named in `replace` (task ids, message ids)."""
    now = datetime.now(UTC)
    if tasks:
        await sql.delete_by_key(task_status, replace[0])
        await sql.insert(task_status, [{**_fields(t), "updated_at": now} for t in tasks.values()])
    if emails:
        await sql.delete_by_key(email_log, replace[1])
        await sql.insert(email_log, [{**_fields(e), "updated_at": now} for e in emails.values()])


_REBUILD_CHUNK = (
    select(events.c.position, events.c.stream_id, events.c.type, type_coerce(events.c.data, Text))
    .where(events.c.position > bindparam("after"))
    .order_by(events.c.position)
    .limit(REBUILD_CHUNK)
)
_TASK_FIELDS = tuple(TaskState.__dataclass_fields__)  # in the order of TaskState(...)
_EMAIL_FIELDS = tuple(EmailState.__dataclass_fields__)


def _parsed(data: str | dict[str, Any]) -> dict[str, Any]:
    """An event's data as read for a rebuild: SQLite hands back the JSON text, asyncpg the decoded value."""
    return orjson.loads(data) if isinstance(data, str) else data


def _fields(state: TaskState | EmailState) -> dict[str, Any]:
    """A state's fields, shallow (`dataclasses.asdict` deep-copies every value, for every row of a rebuild)."""
    return {name: getattr(state, name) for name in state.__dataclass_fields__}
