"""`pipeline tasks show TASK_ID`: a completion task's live status, and with `--history` its events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from streams.cli.common import EXIT_NOT_FOUND, fail, load_settings, mask_url, plural, safe
from streams.cli.events import event_line
from streams.cli.readstore import open_event_store, run_store
from streams.eventstore.projections import TaskState
from streams.eventstore.store import StoredEvent
from streams.eventstore.tables import events, task_status

app = typer.Typer(
    help="Completion tasks, as the event store's `task_status` projection has them.", no_args_is_help=True
)

STREAM_PREFIX = "completion-"
PAGE = 1000


@dataclass(frozen=True, slots=True)
class TaskView:
    """What `tasks show` prints: the live state (None when unknown) and the events asked for."""

    state: TaskState | None
    history: list[StoredEvent]
    logged: bool  # the log holds events of the task's stream


def stream_of(task_id: str) -> str:
    """The stream a completion task's events are appended to."""
    return STREAM_PREFIX + task_id


async def load_task(url: str, task_id: str, *, history: bool) -> TaskView:
    """The task's live state; its whole history when asked, else whether the log knows it at all."""
    async with open_event_store(url, [events, task_status]) as store:
        state = await store.task(task_id)
        if not history:
            # One event is enough to tell "never seen" from "projection behind the log".
            logged = state is not None or bool(await store.read(stream_id=stream_of(task_id), limit=1))
            return TaskView(state, [], logged)
        found: list[StoredEvent] = []
        after = 0
        while page := await store.read(stream_id=stream_of(task_id), after=after, limit=PAGE):
            found += page
            after = page[-1].position
        return TaskView(state, found, bool(found))


def describe_task(state: TaskState) -> list[str]:
    """The task's facts, one per line; a multi-line result or reason stays indented under its label."""
    facts: list[tuple[str, object]] = [
        ("status", state.status),
        ("attempts", state.attempts),
        ("model", state.model or "-"),
    ]
    if state.result is not None:
        facts.append(("result", state.result))
    if state.reason is not None:
        facts.append(("reason", state.reason))
    facts += [("message id", state.message_id or "-"), ("last event", f"position {state.position}")]
    lines = [f"task {safe(state.task_id)}"]
    for label, value in facts:
        first, *rest = safe(value).splitlines() or [""]
        lines.append(f"  {label + ':':<12}{first}")
        lines += [f"  {'':<12}{line}" for line in rest]
    return lines


@app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(metavar="TASK_ID", help="The task id given with the completion request.")],
    history: Annotated[bool, typer.Option("--history", help="Also list the task's events, oldest first.")] = False,
) -> None:
    """Show a completion task: status, attempts, model, result or reason, message id, last position."""
    url = load_settings().database_url
    view = run_store(load_task(url, task_id, history=history))
    if view.state is None:
        where = f"the database at {mask_url(url)}"
        if view.logged:
            fail(
                f"task {task_id!r} has events in {where} but no task_status row: run `pipeline projections rebuild`",
                EXIT_NOT_FOUND,
            )
        fail(f"no task {task_id!r} in {where}", EXIT_NOT_FOUND)
    lines = describe_task(view.state)
    if history:
        lines += [f"history ({plural(len(view.history), 'event')}, oldest first):"]
        lines += [event_line(ev) for ev in view.history]
    typer.echo("\n".join(lines))
