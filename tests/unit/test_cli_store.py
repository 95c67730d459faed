"""`pipeline tasks|events|projections`: what the event store holds, read without creating anything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Executable, delete, insert, update
from typer.testing import CliRunner, Result

from schemas import (
    CompletionFailed,
    CompletionRequested,
    CompletionSucceeded,
    EmailSent,
    Event,
    FailureKind,
    MessageDeadLettered,
    RetryScheduled,
)
from streams.cli import app
from streams.cli import events as events_cli
from streams.core.envelope import Envelope
from streams.core.settings import get_settings
from streams.eventstore.projections import TaskState
from streams.eventstore.store import Commit, EventStore
from streams.eventstore.tables import email_log, task_status

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]

# One completion task per status: task id -> its message id.
TASKS = {
    "t-requested": "m-requested",
    "t-processing": "m-processing",
    "t-succeeded": "m-succeeded",
    "t-failed": "m-failed",
    "t-dead": "m-dead",
}
MAIL_ID = "m-mail"


# --- a scratch store ----------------------------------------------------------------------------


def env(mid: str, queue: str = "ai.completion", attempt: int = 1) -> Envelope:
    return Envelope("rabbit", queue, mid, f"c-{mid}", b"{}", {}, attempt=attempt)


def ids(mid: str) -> dict[str, str]:
    return {"message_id": mid, "correlation_id": f"c-{mid}"}


def requested(task: str) -> CompletionRequested:
    return CompletionRequested(**ids(TASKS[task]), task_id=task, model="echo")


def retry(task: str, attempt: int) -> RetryScheduled:
    return RetryScheduled(
        **ids(TASKS[task]),
        queue="ai.completion",
        attempt=attempt,
        delay_seconds=1.0,
        exception_type="TransientError",
        exception_message="provider down",
    )


def dead_lettered(mid: str, attempts: int, kind: FailureKind, message: str) -> MessageDeadLettered:
    return MessageDeadLettered(
        **ids(mid),
        queue="ai.completion",
        dead_letter_queue="ai.completion.dlq",
        failure_kind=kind,
        exception_type="handlers.errors.FatalError",
        exception_message=message,
        attempts=attempts,
    )


def history() -> list[Commit]:
    """The commits a worker would have made, in order; every status of a task appears once."""

    def stored(task: str, *events: Event, attempt: int = 1) -> Commit:
        return Commit(f"completion-{task}", list(events), env(TASKS[task], attempt=attempt), publish=False)

    def outcome(task: str, *events: Event, attempt: int = 1) -> Commit:
        return Commit(f"completion-{task}", list(events), env(TASKS[task], attempt=attempt), consumer="completion")

    return [
        stored("t-requested", requested("t-requested")),
        stored("t-processing", requested("t-processing")),
        stored("t-processing", retry("t-processing", 1)),
        stored("t-succeeded", requested("t-succeeded")),
        stored("t-succeeded", retry("t-succeeded", 1)),
        outcome(
            "t-succeeded",
            CompletionSucceeded(**ids("m-succeeded"), task_id="t-succeeded", model="echo", completion="hello\nworld"),
            attempt=2,
        ),
        stored("t-failed", requested("t-failed")),
        outcome(
            "t-failed",
            CompletionFailed(
                **ids("m-failed"),
                task_id="t-failed",
                model="echo",
                reason="prompt refused",
                failure_kind=FailureKind.FATAL,
            ),
            dead_lettered("m-failed", 1, FailureKind.FATAL, "prompt refused"),
        ),
        stored("t-dead", requested("t-dead")),
        Commit(
            "completion-t-dead",
            [dead_lettered("m-dead", 5, FailureKind.EXHAUSTED, "provider down")],
            env("m-dead", attempt=5),
        ),
        Commit(
            f"email-{MAIL_ID}",
            [EmailSent(**ids(MAIL_ID), to="ada@example.com", subject="Hi", provider_id="p-1")],
            env(MAIL_ID, "email"),
            consumer="email",
        ),
    ]


async def write(url: str, commits: list[Commit]) -> None:
    store = EventStore(url)
    try:
        await store.start()
        for unit in commits:
            await store.commit(unit)
    finally:
        await store.close()


async def live_tasks(url: str) -> dict[str, TaskState | None]:
    store = EventStore(url)
    try:
        return {task: await store.task(task) for task in TASKS}
    finally:
        await store.close()


async def execute(url: str, *statements: Executable) -> None:
    store = EventStore(url)
    try:
        async with store.engine.begin() as conn:
            for statement in statements:
                await conn.execute(statement)
    finally:
        await store.close()


@dataclass
class Db:
    url: str
    path: Path


def point_at(monkeypatch: pytest.MonkeyPatch, path: Path) -> str:
    url = f"sqlite+aiosqlite:///{path}"
    monkeypatch.setenv("PIPELINE_DATABASE_URL", url)
    get_settings.cache_clear()
    return url


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    """The scratch store with `history()` written, also what the CLI reads; no `.env`."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "store.db"
    url = point_at(monkeypatch, path)
    asyncio.run(write(url, history()))
    yield Db(url, path)
    get_settings.cache_clear()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def event_lines(result: Result) -> list[list[str]]:
    return [line.split() for line in result.stdout.splitlines()]


# --- tasks show ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "status", "attempts", "detail"),
    [
        ("t-requested", "requested", 1, None),
        ("t-processing", "processing", 2, None),
        ("t-succeeded", "succeeded", 2, "result:     hello"),
        ("t-failed", "failed", 1, "reason:     prompt refused"),
        ("t-dead", "dead-lettered", 5, "reason:     provider down"),
    ],
)
def test_tasks_show_prints_each_status(db: Db, task: str, status: str, attempts: int, detail: str | None) -> None:
    """Each status of the task_status projection is shown with attempts, model, outcome and message id."""
    result = invoke("tasks", "show", task)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"task {task}"
    assert f"  status:     {status}" in lines
    assert f"  attempts:   {attempts}" in lines
    assert "  model:      echo" in lines
    assert f"  message id: {TASKS[task]}" in lines
    assert any(line.startswith("  last event: position ") for line in lines)
    if detail is not None:
        assert f"  {detail}" in lines
    else:
        assert not any(line.startswith(("  result:", "  reason:")) for line in lines)


def test_tasks_show_keeps_a_multiline_result_under_its_label(db: Db) -> None:
    """A completion with several lines stays readable: later lines are indented under `result:`."""
    result = invoke("tasks", "show", "t-succeeded")

    assert "  result:     hello\n              world\n" in result.stdout


def test_tasks_show_last_position_is_the_tasks_last_event(db: Db) -> None:
    """`last event` names the position of the newest event of the task's stream."""
    log = invoke("events", "--stream", "completion-t-succeeded")
    last = event_lines(log)[-1][0]

    result = invoke("tasks", "show", "t-succeeded")

    assert f"  last event: position {last}" in result.stdout.splitlines()


def test_tasks_show_history_lists_the_task_events_oldest_first(db: Db) -> None:
    """--history adds the task's own events, in order, as `pipeline events` prints them."""
    result = invoke("tasks", "show", "t-succeeded", "--history")

    assert result.exit_code == 0, result.output
    head, rest = result.stdout.split("history (3 events, oldest first):\n")
    assert "status:     succeeded" in head
    rows = [line.split() for line in rest.splitlines()]
    assert [(r[2], r[3], r[4], r[5]) for r in rows] == [
        ("completion-t-succeeded", "1", "completion.requested", "m-succeeded"),
        ("completion-t-succeeded", "2", "message.retry_scheduled", "m-succeeded"),
        ("completion-t-succeeded", "3", "completion.succeeded", "m-succeeded"),
    ]
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)


def test_tasks_show_unknown_task_exits_1(db: Db) -> None:
    """A task id the store never saw is an error on stderr, exit 1, nothing on stdout."""
    result = invoke("tasks", "show", "t-nope")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert "no task 't-nope'" in result.stderr


def test_tasks_show_a_task_missing_from_the_projection_suggests_a_rebuild(db: Db) -> None:
    """Events without a task_status row mean the projection is behind: say how to fix it."""
    asyncio.run(execute(db.url, delete(task_status).where(task_status.c.task_id == "t-failed")))

    result = invoke("tasks", "show", "t-failed")

    assert result.exit_code == 1
    assert "has events" in result.stderr
    assert "pipeline projections rebuild" in result.stderr


# --- a store that is not there -------------------------------------------------------------------


@pytest.mark.parametrize("args", [["tasks", "show", "t-1"], ["events"], ["projections", "rebuild", "--check"]])
def test_a_database_without_tables_is_an_error_and_stays_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Reading never creates tables: exit 1 saying the worker or `pipeline db upgrade` creates them."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    point_at(monkeypatch, path)

    result = invoke(*args)

    assert result.exit_code == 1
    assert "has no events" in result.stderr
    assert "pipeline db upgrade" in result.stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []
    get_settings.cache_clear()


def test_a_missing_database_file_is_an_error_and_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQLite URL naming no file is reported, not silently created."""
    path = tmp_path / "nowhere.db"
    point_at(monkeypatch, path)

    result = invoke("events")

    assert result.exit_code == 1
    assert f"the database file {path} does not exist" in result.stderr
    assert not path.exists()
    get_settings.cache_clear()


# --- events -------------------------------------------------------------------------------------


def test_events_lists_the_log_in_global_order(db: Db) -> None:
    """One line per event: position, recorded at, stream, version, type, message id."""
    result = invoke("events")

    assert result.exit_code == 0, result.output
    rows = event_lines(result)
    assert len(rows) == 12
    positions = [int(r[0]) for r in rows]
    assert positions == sorted(positions)
    assert all(r[1].endswith("Z") and "T" in r[1] for r in rows)
    assert rows[0][2:] == ["completion-t-requested", "1", "completion.requested", "m-requested"]
    assert rows[-1][2:] == [f"email-{MAIL_ID}", "1", "email.sent", MAIL_ID]


def test_events_filters_by_stream_type_after_and_limit(db: Db) -> None:
    """--stream, --type, --after and --limit narrow the log, and combine."""
    everything = event_lines(invoke("events"))

    by_stream = event_lines(invoke("events", "--stream", "completion-t-dead"))
    by_type = event_lines(invoke("events", "--type", "message.dead_lettered"))
    after = event_lines(invoke("events", "--after", everything[9][0]))
    limited = event_lines(invoke("events", "--limit", "3"))
    combined = event_lines(invoke("events", "-t", "completion.requested", "--after", everything[2][0], "-n", "2"))

    assert [(r[3], r[4]) for r in by_stream] == [("1", "completion.requested"), ("2", "message.dead_lettered")]
    assert [r[2] for r in by_type] == ["completion-t-failed", "completion-t-dead"]
    assert after == everything[10:]
    assert limited == everything[:3]
    assert [r[2] for r in combined] == ["completion-t-succeeded", "completion-t-failed"]


def test_events_json_lines_carry_data_and_metadata(db: Db) -> None:
    """--json prints one JSON object per line with everything the log holds."""
    result = invoke("events", "--json", "--type", "completion.succeeded")

    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    record = json.loads(line)
    assert set(record) == {
        "position", "recorded_at", "stream_id", "version", "event_id", "type", "message_id", "data", "metadata"
    }  # fmt: skip
    assert record["stream_id"] == "completion-t-succeeded"
    assert record["version"] == 3
    assert record["type"] == "completion.succeeded"
    assert record["message_id"] == "m-succeeded"
    assert record["data"]["completion"] == "hello\nworld"
    assert record["metadata"]["correlation_id"] == "c-m-succeeded"
    assert record["metadata"]["attempt"] == 2


def test_events_on_an_empty_log_print_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No events is not an error."""
    url = point_at(monkeypatch, tmp_path / "fresh.db")
    asyncio.run(write(url, []))

    result = invoke("events")

    assert result.exit_code == 0
    assert result.stdout == ""
    get_settings.cache_clear()


def test_events_follow_prints_new_events_until_ctrl_c(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """--follow polls after the last position printed; Ctrl-C ends it with exit 0."""
    polls: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:  # a worker commits while the follower waits
            await write(db.url, [Commit("completion-t-late", [late], env("m-late"), publish=False)])
            return
        raise KeyboardInterrupt

    late = CompletionRequested(**ids("m-late"), task_id="t-late", model="echo")
    monkeypatch.setattr(events_cli, "_sleep", fake_sleep)

    result = invoke("events", "--follow", "--type", "completion.requested", "--interval", "0.25")

    assert result.exit_code == 0, result.output
    streams = [r[2] for r in event_lines(result)]
    assert streams == [f"completion-{t}" for t in TASKS] + ["completion-t-late"]
    assert polls == [0.25, 0.25]


def test_events_follow_with_limit_stops_after_n_events(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """--limit also ends a follow, once that many events were printed."""

    async def fake_sleep(seconds: float) -> None:
        await write(
            db.url, [Commit("email-m-2", [EmailSent(**ids("m-2"), to="b@example.com", subject="s")], env("m-2"))]
        )

    monkeypatch.setattr(events_cli, "_sleep", fake_sleep)

    result = invoke("events", "--follow", "--type", "email.sent", "--limit", "2")

    assert result.exit_code == 0, result.output
    assert [r[2] for r in event_lines(result)] == [f"email-{MAIL_ID}", "email-m-2"]


def test_events_follow_ends_with_exit_0_on_sigint(db: Db) -> None:
    """A real Ctrl-C (SIGINT) to the running command ends it quietly with exit 0."""
    environment = {**os.environ, "PIPELINE_DATABASE_URL": db.url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "events", "--follow", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the backlog is printed before the first poll
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "completion-t-requested" in first
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


# --- projections rebuild ------------------------------------------------------------------------


def test_rebuild_reports_counts_and_equals_the_live_state(db: Db) -> None:
    """A rebuild folds the whole log; the rebuilt rows equal those the workers kept live."""
    before = asyncio.run(live_tasks(db.url))

    result = invoke("projections", "rebuild")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("rebuilt task_status (5 tasks) and email_log (1 e-mail) from 12 events in ")
    assert result.stdout.rstrip().endswith("s")
    assert asyncio.run(live_tasks(db.url)) == before
    assert all(state is not None for state in before.values())


def test_check_after_rebuild_finds_them_equal(db: Db) -> None:
    """--check compares a fold from scratch with the live tables: equal, exit 0, nothing written."""
    assert invoke("projections", "rebuild").exit_code == 0

    result = invoke("projections", "rebuild", "--check")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("projections match the log: 12 events up to position ")
    assert "5 tasks, 1 e-mail" in result.stdout


def test_check_ignores_updated_at(db: Db) -> None:
    """`updated_at` records when a row was written, not what it says: it is not compared."""
    asyncio.run(execute(db.url, update(task_status).values(updated_at=task_status.c.updated_at)))

    assert invoke("projections", "rebuild", "--check").exit_code == 0


def test_check_lists_tampered_rows_and_exits_1(db: Db) -> None:
    """A changed, a missing and an extra live row are each named; a rebuild then repairs them."""
    ghost = {
        "task_id": "t-ghost", "status": "succeeded", "attempts": 1, "model": None, "result": None, "reason": None,
        "message_id": None, "position": 1, "updated_at": datetime.now(UTC),
    }  # fmt: skip
    asyncio.run(
        execute(
            db.url,
            update(task_status).where(task_status.c.task_id == "t-succeeded").values(status="failed", attempts=9),
            delete(email_log).where(email_log.c.message_id == MAIL_ID),
            insert(task_status).values(**ghost),
        )
    )

    result = invoke("projections", "rebuild", "--check")

    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "task_status t-ghost: not in the log, yet live with status 'succeeded'",
        "task_status t-succeeded: status is 'failed', the log says 'succeeded'",
        "task_status t-succeeded: attempts is 9, the log says 2",
        f"email_log {MAIL_ID}: missing, the log folds to status 'sent'",
    ]
    assert "4 differences" in result.stderr

    assert invoke("projections", "rebuild").exit_code == 0
    assert invoke("projections", "rebuild", "--check").exit_code == 0
