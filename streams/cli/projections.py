"""`pipeline projections rebuild [--check]`: refold `task_status` and `email_log` from the log.

Without `--check` both tables are replaced by a fold of the whole log. With `--check` nothing
is written: a fold from scratch (in chunks) is compared with the live tables, ignoring
`updated_at`, and every difference is listed (exit 1). Live rows whose stream moved on during
the check are left out of the comparison rather than reported.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, fields
from typing import Annotated, TypeVar

import typer
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from streams.cli.common import load_settings, plural, safe
from streams.cli.readstore import open_event_store, run_store
from streams.eventstore import projections
from streams.eventstore.projections import EmailState, Recorded, TaskState
from streams.eventstore.store import EventStore
from streams.eventstore.tables import email_log, events, task_status

app = typer.Typer(help="Projections: folds over the event log, kept live by the workers.", no_args_is_help=True)

TABLES = (events, task_status, email_log)
EXIT_DIFFERENT = 1
MAX_LISTED = 200  # differences printed; the count covers them all
S = TypeVar("S", TaskState, EmailState)


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What a rebuild did."""

    events: int
    tasks: int
    emails: int
    seconds: float
    arrived: int  # events appended while it ran, which the rebuilt tables may lack


@dataclass(frozen=True, slots=True)
class Checked:
    """What a check found."""

    events: int
    upto: int  # the last position folded
    tasks: int
    emails: int
    differences: list[str]
    skipped: int  # live rows that moved on during the check


# --- comparing (pure) ---------------------------------------------------------------------------


def differences(table: str, folded: dict[str, S], live: dict[str, S]) -> list[str]:
    """Each row where the live table and the fold disagree, field by field, in key order."""
    found: list[str] = []
    for key in sorted(folded.keys() | live.keys()):
        want, have = folded.get(key), live.get(key)
        if have is None:
            assert want is not None
            found.append(f"{table} {safe(key)}: missing, the log folds to status {want.status!r}")
        elif want is None:
            found.append(f"{table} {safe(key)}: not in the log, yet live with status {have.status!r}")
        elif want != have:
            for f, a, b in zip(fields(want), astuple(have), astuple(want), strict=True):
                if a != b:
                    found.append(f"{table} {safe(key)}: {f.name} is {safe(repr(a))}, the log says {safe(repr(b))}")
    return found


# --- the store ----------------------------------------------------------------------------------


async def _last_position(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.max(events.c.position))) or 0)


async def _live(engine: AsyncEngine, table: Table, state: type[S]) -> dict[str, S]:
    names = [f.name for f in fields(state)]
    async with engine.connect() as conn:
        rows = (await conn.execute(select(*(table.c[n] for n in names)))).all()
    return {str(r[0]): state(*r) for r in rows}


async def fold_log(store: EventStore, upto: int) -> tuple[int, dict[str, TaskState], dict[str, EmailState]]:
    """Fold every event up to position `upto` from scratch, a chunk at a time."""
    tasks: dict[str, TaskState] = {}
    emails: dict[str, EmailState] = {}
    after, seen = 0, 0
    while after < upto:
        chunk = [e for e in await store.read(after=after, limit=projections.REBUILD_CHUNK) if e.position <= upto]
        if not chunk:
            break
        projections.fold(tasks, emails, (Recorded(e.position, e.stream_id, e.type, e.data) for e in chunk))
        after, seen = chunk[-1].position, seen + len(chunk)
    return seen, tasks, emails


async def check(url: str) -> Checked:
    """Compare a fold of the log with the live tables; writes nothing."""
    async with open_event_store(url, TABLES) as store:
        # The position first, then the live rows: every event up to it is in them (committed
        # together), and a row past it belongs to a stream that moved on since; it is skipped.
        upto = await _last_position(store.engine)
        live_tasks = await _live(store.engine, task_status, TaskState)
        live_emails = await _live(store.engine, email_log, EmailState)
        seen, tasks, emails = await fold_log(store, upto)
    moved_tasks = {k for k, v in live_tasks.items() if v.position > upto}
    moved_emails = {k for k, v in live_emails.items() if v.position > upto}
    found = differences(
        task_status.name,
        {k: v for k, v in tasks.items() if k not in moved_tasks},
        {k: v for k, v in live_tasks.items() if k not in moved_tasks},
    )
    found += differences(
        email_log.name,
        {k: v for k, v in emails.items() if k not in moved_emails},
        {k: v for k, v in live_emails.items() if k not in moved_emails},
    )
    return Checked(seen, upto, len(tasks), len(emails), found, len(moved_tasks) + len(moved_emails))


async def rebuild(url: str) -> Rebuilt:
    """Replace both projection tables with a fold of the whole log, timed."""
    async with open_event_store(url, TABLES) as store:
        before = await _last_position(store.engine)
        started = time.perf_counter()
        seen, tasks, emails = await projections.rebuild(store.engine)
        seconds = time.perf_counter() - started
        after = await _last_position(store.engine)
    return Rebuilt(seen, tasks, emails, seconds, max(after - before, 0))


# --- the command --------------------------------------------------------------------------------


@app.command("rebuild")
def rebuild_command(
    check_only: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing: compare a fold of the log with the live tables; exit 1 listing the differences.",
        ),
    ] = False,
) -> None:
    """Rebuild task_status and email_log from the event log (or, with --check, verify them)."""
    url = load_settings().database_url
    if not check_only:
        done = run_store(rebuild(url))
        typer.echo(
            f"rebuilt {task_status.name} ({plural(done.tasks, 'task')}) and {email_log.name} "
            f"({plural(done.emails, 'e-mail')}) from {plural(done.events, 'event')} in {done.seconds:.3f}s"
        )
        if done.arrived:
            typer.echo(
                f"warning: {plural(done.arrived, 'event')} arrived while rebuilding and may be missing from "
                "the projections: run it again with the workers stopped, then `--check`",
                err=True,
            )
        return
    result = run_store(check(url))
    summary = (
        f"{plural(result.events, 'event')} up to position {result.upto}: "
        f"{plural(result.tasks, 'task')}, {plural(result.emails, 'e-mail')}"
    )
    if result.skipped:
        typer.echo(f"skipped {plural(result.skipped, 'live row')} whose stream moved on during the check", err=True)
    if not result.differences:
        typer.echo(f"projections match the log: {summary}")
        return
    typer.echo("\n".join(result.differences[:MAX_LISTED]))
    if len(result.differences) > MAX_LISTED:
        typer.echo(f"... and {len(result.differences) - MAX_LISTED} more")
    typer.echo(
        f"{plural(len(result.differences), 'difference')} between the live projections and a fold of {summary}; "
        "`pipeline projections rebuild` replaces them",
        err=True,
    )
    raise typer.Exit(EXIT_DIFFERENT)
