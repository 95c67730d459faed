"""`pipeline`: the operator's command line (Typer).

`pipeline send email|completion ...` validates a command with the same Pydantic models the
workers use, then publishes it to RabbitMQ (exchange `tasks`) or Redis Streams, exactly as a
producer should: persistent, confirmed, with a message id (the idempotency key) and a
correlation id. The message id is the only thing written to stdout, so scripts can capture it:

    MID=$(pipeline send email --to ada@example.com --subject Hi --body Hello)

Everything else (where it went, how to watch the outcome, errors) goes to stderr.
Exit codes: 0 published, 1 broker unreachable or refused the message, 2 invalid input or
settings (nothing is published).

`pipeline dlq list|show|replay|purge` reviews the dead letters kept in PIPELINE_DATABASE_URL,
puts them back through the normal path (same message and correlation ids, attempt count reset)
and deletes them, only once confirmed. Exit codes: 0 done, 1 not found, database or broker
unavailable, purge not confirmed, 2 invalid input or settings.

`pipeline tasks show TASK_ID`, `pipeline events [--stream ID] [--type T] [--follow]` and
`pipeline projections rebuild [--check]` read the event store at PIPELINE_DATABASE_URL (and the
rebuild rewrites its projections). They never create tables: on a database without them they
exit 1 and say so. Exit codes: 0 done (also Ctrl-C ending `--follow`), 1 unknown task, database
unavailable or, with `--check`, projections that differ from the log, 2 invalid input or settings.

`pipeline db upgrade|current` applies or checks the schema migrations (Alembic).

One module per command group, registered here in one visible table.
"""

from __future__ import annotations

import typer

from streams.cli import db, dlq, events, projections, send, tasks

app = typer.Typer(
    name="pipeline",
    help=(
        "Operate the message pipeline: publish commands to RabbitMQ or Redis Streams; review and replay "
        "dead letters; read the event store and rebuild its projections."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(send.app, name="send")
app.add_typer(dlq.app, name="dlq")
app.command("events")(events.events)
app.add_typer(tasks.app, name="tasks")
app.add_typer(projections.app, name="projections")
app.add_typer(db.db_app, name="db")

__all__ = ["app"]
