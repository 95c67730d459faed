"""`pipeline db upgrade|current`: the event store's schema revision (Alembic migrations).

`pipeline db upgrade` brings the database at PIPELINE_DATABASE_URL (or `--url`) to the revision
this code needs; it is safe to repeat and to run from several places at once. `pipeline db
current` prints the database's revision and whether it is up to date, for scripts and
readiness gates. Passwords in URLs are masked in everything printed.

Exit codes: 0 done or up to date, 1 outdated, refused (schema from a newer release) or
database unavailable, 2 invalid settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from streams.core.settings import get_settings, mask_url
from streams.eventstore import schema

EXIT_FAILED = 1
EXIT_INVALID = 2

T = TypeVar("T")

db_app = typer.Typer(
    name="db",
    help="The database schema: show its revision, upgrade it to the one this code needs.",
    no_args_is_help=True,
    add_completion=False,
)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Database URL (default: PIPELINE_DATABASE_URL).", show_default=False),
]


@db_app.command()
def upgrade(url: UrlOption = None) -> None:
    """Upgrade the database schema to the revision this code needs; prints from and to which."""
    target = _database_url(url)
    before, after = _run(schema.migrate(target), target)
    if before == after:
        typer.echo(f"{mask_url(target)}: already at revision {after} (head), nothing to do")
    else:
        typer.echo(f"{mask_url(target)}: upgraded from revision {_shown(before)} to {after} (head)")


@db_app.command()
def current(url: UrlOption = None) -> None:
    """Print the database's schema revision and whether it is up to date (exit 1 when it is not)."""
    target = _database_url(url)
    revision = _run(schema.current_revision(target), target)
    if revision == schema.HEAD:
        typer.echo(f"{revision} (head): up to date")
        return
    typer.echo(f"{_shown(revision)}: outdated, the code needs {schema.HEAD}")
    typer.echo(schema.outdated_message(revision, target), err=True)
    raise typer.Exit(EXIT_FAILED)


def _shown(revision: str | None) -> str:
    return revision if revision is not None else "none (empty database)"


def _database_url(url: str | None) -> str:
    if url is not None:
        if not url.startswith(schema.DRIVERS):
            typer.echo(f"invalid --url: use {' or '.join(schema.DRIVERS)}", err=True)
            raise typer.Exit(EXIT_INVALID)
        return url
    try:
        return get_settings().database_url
    except ValidationError as exc:
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from exc


def _run(work: Coroutine[Any, Any, T], url: str) -> T:
    """Run one database call; known failures become a line on stderr and exit code 1."""
    try:
        return asyncio.run(work)
    except schema.SchemaOutdatedError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_FAILED) from exc
    except (SQLAlchemyError, OSError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        typer.echo(f"database unavailable ({mask_url(url)}): {type(reason).__name__}: {reason}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc
