"""`pipeline events`: the event log in global order, as lines or JSON lines, optionally followed.

`--follow` polls for events after the last one printed until Ctrl-C (exit 0). On PostgreSQL
with several workers, positions are handed out before their transactions commit, so an event
committed after a later-numbered one may be passed over by a poll; SQLite writes one
transaction at a time and has no such gap.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from streams.cli.common import load_settings, safe, timestamp
from streams.cli.readstore import open_event_store, run_store
from streams.eventstore.store import StoredEvent
from streams.eventstore.tables import events as events_table

PAGE = 1000  # events per read
# Widths that line up the usual ids (`completion-<uuid4>`) and the longest event type.
STREAM_WIDTH = 47
TYPE_WIDTH = 23
DEFAULT_INTERVAL = 0.5

Emit = Callable[[StoredEvent], None]


def message_id(ev: StoredEvent) -> str:
    """The id of the command the event answers (from its metadata, else its data)."""
    return str(ev.metadata.get("message_id") or ev.data.get("message_id") or "-")


def event_line(ev: StoredEvent) -> str:
    """One event on one line: position, recorded at, stream, version, type, message id."""
    return (
        f"{ev.position:>8}  {timestamp(ev.recorded_at)}  {safe(ev.stream_id):<{STREAM_WIDTH}}  {ev.version:>4}  "
        f"{safe(ev.type):<{TYPE_WIDTH}}  {safe(message_id(ev))}"
    )


def event_json(ev: StoredEvent) -> str:
    """One event as one line of JSON, everything the log holds (non-ASCII escaped)."""
    record: dict[str, Any] = {
        "position": ev.position,
        "recorded_at": timestamp(ev.recorded_at),
        "stream_id": ev.stream_id,
        "version": ev.version,
        "event_id": ev.event_id,
        "type": ev.type,
        "message_id": message_id(ev),
        "data": ev.data,
        "metadata": ev.metadata,
    }
    return json.dumps(record, separators=(",", ":"), default=str)


async def _sleep(seconds: float) -> None:
    """The pause between two polls (a seam for tests)."""
    await asyncio.sleep(seconds)


async def stream_events(
    url: str,
    emit: Emit,
    *,
    stream_id: str | None = None,
    type_: str | None = None,
    after: int = 0,
    limit: int | None = None,
    follow: bool = False,
    interval: float = DEFAULT_INTERVAL,
) -> int:
    """Emit matching events after `after` in order, page by page; with `follow`, keep polling.

    Stops after `limit` events when given (also when following); returns how many were emitted.
    """
    emitted = 0
    async with open_event_store(url, [events_table]) as store:
        while limit is None or emitted < limit:
            want = PAGE if limit is None else min(PAGE, limit - emitted)
            batch = await store.read(stream_id=stream_id, type_=type_, after=after, limit=want)
            for ev in batch:
                emit(ev)
            emitted += len(batch)
            after = batch[-1].position if batch else after
            if len(batch) == want:
                continue  # a full page: more may be waiting already
            if not follow:
                break
            await _sleep(interval)
    return emitted


def _silence_stdout() -> None:
    """After a closed pipe (`| head`), send what is left to /dev/null so exiting stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. under a test runner)
        pass


def events(
    stream: Annotated[
        str | None,
        typer.Option("--stream", "-s", metavar="ID", help="Only events of this stream (e.g. completion-T1)."),
    ] = None,
    type_: Annotated[
        str | None, typer.Option("--type", "-t", metavar="T", help="Only events of this type (e.g. email.sent).")
    ] = None,
    after: Annotated[int, typer.Option("--after", metavar="POS", min=0, help="Only events after this position.")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", metavar="N", min=1, help="Stop after N events (also with --follow).")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for new events until Ctrl-C.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line, with the event's data and metadata.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="With --follow: seconds between two polls.")
    ] = DEFAULT_INTERVAL,
) -> None:
    """Print the event log in global order: position, recorded at, stream, version, type, message id."""
    url = load_settings().database_url
    render = event_json if as_json else event_line

    def emit(ev: StoredEvent) -> None:
        typer.echo(render(ev))  # echo flushes: a follower's pipe sees each line at once

    try:
        emitted = run_store(
            stream_events(
                url, emit, stream_id=stream, type_=type_, after=after, limit=limit, follow=follow, interval=interval
            )
        )
    except KeyboardInterrupt:  # Ctrl-C is how --follow ends
        raise typer.Exit(0) from None
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say
        _silence_stdout()
        raise typer.Exit(0) from None
    if not emitted:
        typer.echo("no events match", err=True)
