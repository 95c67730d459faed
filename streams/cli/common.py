"""What every `pipeline` command shares: settings, errors on stderr, exit codes, safe text, tables."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from streams.core.settings import Settings, describe_errors, get_settings, mask_url
from streams.deadletters import printable, redact

EXIT_UNAVAILABLE = 1  # a database or broker unreachable, or refused what was asked
EXIT_NOT_FOUND = 1
EXIT_INVALID = 2  # invalid input or settings: nothing was done
DEFAULT_TIMEOUT = 10.0
PIPED_WIDTH = 240  # no terminal to fit: keep each table row on one line
_QUIET_LOGGERS = ("aiormq", "aio_pika", "faststream")

TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the connection and the broker's confirm."),
]

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXIT_INVALID",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "TimeoutOpt",
    "fail",
    "load_settings",
    "mask_url",
    "one_line",
    "plural",
    "quiet_client_logs",
    "render",
    "safe",
    "timestamp",
    "when",
]


def fail(message: str, code: int) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings; when they are invalid, name each bad variable and exit 2."""
    try:
        return get_settings()
    except ValidationError as exc:
        fail(f"invalid settings: {describe_errors(exc)}", EXIT_INVALID)


@contextmanager
def quiet_client_logs() -> Iterator[None]:
    """Keep the client libraries' own error logs (and tracebacks) off the terminal."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (its cause's repr when it has no text)."""
    text = str(exc).strip() or repr(exc.__context__ or exc)
    return " ".join(text.split())


def safe(value: object) -> str:
    """A value as text fit for a terminal: URL passwords masked, control characters escaped."""
    return printable(redact(str(value)))


def plural(count: int, noun: str) -> str:
    """`1 event`, `2 events`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; the store writes them in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def when(value: datetime | None) -> str:
    """A timestamp to the second in UTC (`2024-05-01T12:00:00Z`), `-` for none."""
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


def timestamp(value: datetime) -> str:
    """A timestamp to the millisecond in UTC (`2024-05-01T12:00:00.123Z`)."""
    return _utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(table: Table) -> str:
    """The table as text for stdout, without rich's trailing padding."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPED_WIDTH)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())
