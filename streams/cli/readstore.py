"""Read-only access to the event store for `pipeline tasks|events|projections`.

Nothing here creates a table or a database file: when they are missing the command says who
creates them (the worker at start-up, or `pipeline db upgrade`) and exits 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Table, inspect
from sqlalchemy.exc import SQLAlchemyError

from streams import deadletters
from streams.cli.common import EXIT_UNAVAILABLE, fail
from streams.core.settings import mask_url
from streams.eventstore.store import EventStore

T = TypeVar("T")
HOW_TO_CREATE = "the worker creates {what} when it starts, or run `pipeline db upgrade`"


class StoreUnavailableError(Exception):
    """Raised when the event store is missing, lacks a table or cannot be read; the text is shown as is."""


@asynccontextmanager
async def open_event_store(url: str, tables: Sequence[Table]) -> AsyncIterator[EventStore]:
    """The event store at `url`, checked to hold `tables`; closed afterwards. Never starts it."""
    shown = mask_url(url)
    if (missing_file := deadletters.missing_sqlite_file(url)) is not None:
        raise StoreUnavailableError(
            f"the database file {missing_file} does not exist (PIPELINE_DATABASE_URL={shown}): "
            + HOW_TO_CREATE.format(what="it and its tables")
        )
    store = EventStore(url)
    try:
        try:
            async with store.engine.connect() as conn:
                present = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailableError(f"cannot read the database at {shown}: {deadletters.reason(exc)}") from exc
        if missing := [t.name for t in tables if t.name not in present]:
            raise StoreUnavailableError(
                f"the database at {shown} has no {_listed(missing)}: "
                + HOW_TO_CREATE.format(what="it" if len(missing) == 1 else "them")
            )
        yield store
    finally:
        await store.close()


def _listed(tables: Sequence[str]) -> str:
    """`events table`, `events and task_status tables`, `a, b and c tables`."""
    if len(tables) == 1:
        return f"{tables[0]} table"
    return f"{', '.join(tables[:-1])} and {tables[-1]} tables"


def run_store(coro: Coroutine[Any, Any, T]) -> T:
    """Run an operation on the store; an unavailable store or a failed query is one line on stderr and exit 1."""
    try:
        return asyncio.run(coro)
    except StoreUnavailableError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    except BrokenPipeError:  # stdout closed by its reader: the caller decides, not a store failure
        raise
    except (SQLAlchemyError, OSError) as exc:
        fail(f"cannot read the event store: {deadletters.reason(exc)}", EXIT_UNAVAILABLE)
