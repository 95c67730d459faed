"""The database schema's revision: read it, check it, upgrade it (Alembic, run in-process).

The migrations live in `migrations/` (one revision per schema change, `migrations/versions`);
`HEAD` is the revision this code needs. Operators run `pipeline db upgrade`; a worker calls
`prepare(url, auto_upgrade=...)` at start-up, which upgrades (development, SQLite files) or
refuses to start on an outdated schema with a message naming the command that fixes it.

Upgrades are safe to run from several processes at once: PostgreSQL serialises them with an
advisory lock inside the one transaction that runs every step (DDL is transactional there);
SQLite with `BEGIN IMMEDIATE` (its write lock) around the same. The late comers find the
schema at HEAD and do nothing.

A database whose tables were made by `metadata.create_all` before migrations existed (no
`alembic_version`) is adopted: revision 0001 creates only the tables that are missing, and
the result must then match `streams.eventstore.tables` exactly or nothing is committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, inspect, make_url, pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import migrations
from handlers.errors import PipelineError
from streams.core.settings import mask_url
from streams.eventstore.tables import metadata

MIGRATIONS_DIR: Final = Path(migrations.__file__).resolve().parent
UPGRADE_COMMAND: Final = "pipeline db upgrade"
DRIVERS: Final = ("sqlite+aiosqlite://", "postgresql+asyncpg://")  # as PIPELINE_DATABASE_URL accepts

_PG_LOCK_KEY: Final = 0x706970656C696E65  # b"pipeline": one migrator at a time per PostgreSQL database
_SQLITE_LOCK_WAIT: Final = 60.0  # seconds a second migrator waits for the first one's write lock


class SchemaOutdatedError(PipelineError):
    """Raised when the database schema is not at the revision this code needs (`HEAD`)."""


def alembic_config() -> Config:
    """An Alembic configuration for `migrations/`, built in code (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def _script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _head(script: ScriptDirectory) -> str:
    head = script.get_current_head()  # raises when the history has several heads
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR / 'versions'}")
    return head


_SCRIPT: Final = _script_directory()
HEAD: Final[str] = _head(_SCRIPT)
KNOWN_REVISIONS: Final[frozenset[str]] = frozenset(s.revision for s in _SCRIPT.walk_revisions())


def include_name(name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames) -> bool:
    """Alembic name filter: only the pipeline's own tables (a shared database may hold others)."""
    return type_ != "table" or name in metadata.tables


def outdated_message(current: str | None, url: str, head: str = HEAD) -> str:
    """What an operator reads when the schema does not match the code: the revisions and the fix."""
    where = f"PIPELINE_DATABASE_URL={mask_url(url)}"
    if current is not None and current not in KNOWN_REVISIONS:
        return (
            f"database schema is at revision {current}, which this code does not know (it needs {head}): "
            f"a newer release upgraded it; run that release ({where})"
        )
    shown = current if current is not None else "none (empty database)"
    return f"database schema is at revision {shown}, the code needs {head}: run `{UPGRADE_COMMAND}` ({where})"


async def current_revision(url: str) -> str | None:
    """The database's schema revision; None for an empty database (or a missing SQLite file)."""
    if _missing_sqlite_file(url):
        return None  # do not create the file just to look into it
    engine = _engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_read_revision)
    finally:
        await engine.dispose()


async def check(url: str) -> None:
    """Raise SchemaOutdatedError unless the database schema is at HEAD."""
    current = await current_revision(url)
    if current != HEAD:
        raise SchemaOutdatedError(outdated_message(current, url))


async def migrate(url: str) -> tuple[str | None, str]:
    """Upgrade the schema to HEAD; returns the revisions before and after (equal: nothing to do)."""
    before = await current_revision(url)
    if before == HEAD:
        return before, HEAD  # the usual start-up: no write lock taken
    if before is not None and before not in KNOWN_REVISIONS:
        raise SchemaOutdatedError(outdated_message(before, url))
    engine = _engine(url, for_migration=True)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(_upgrade, url)
    finally:
        await engine.dispose()


async def upgrade(url: str) -> None:
    """Upgrade the schema to HEAD (`alembic upgrade head`); does nothing when it is there already."""
    await migrate(url)


async def prepare(url: str, *, auto_upgrade: bool) -> None:
    """Make sure the schema is at HEAD before a worker starts: upgrade it, or only check it."""
    if auto_upgrade:
        await upgrade(url)
    else:
        await check(url)


# -- internals ----------------------------------------------------------------------------


def _missing_sqlite_file(url: str) -> bool:
    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return False
    return not Path(path).exists()


def _engine(url: str, *, for_migration: bool = False) -> AsyncEngine:
    if not (for_migration and make_url(url).get_backend_name() == "sqlite"):
        return create_async_engine(url, poolclass=pool.NullPool)
    # The driver's implicit transactions leave DDL outside any transaction: take the write lock
    # ourselves, so the whole upgrade is one transaction and concurrent upgrades queue up.
    # isolation_level=None (sqlite3.connect's own argument): no implicit transactions.
    engine = create_async_engine(
        url, poolclass=pool.NullPool, connect_args={"timeout": _SQLITE_LOCK_WAIT, "isolation_level": None}
    )
    event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
    return engine


def _sqlite_begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _read_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _upgrade(conn: Connection, url: str) -> tuple[str | None, str]:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    before = _read_revision(conn)  # again, now that no other migrator runs
    if before is not None and before not in KNOWN_REVISIONS:
        raise SchemaOutdatedError(outdated_message(before, url))
    adopting = before is None and bool(set(inspect(conn).get_table_names()) & set(metadata.tables))
    config = alembic_config()
    config.attributes["connection"] = conn
    command.upgrade(config, "head")
    if adopting and (diffs := _differences(conn)):
        raise SchemaOutdatedError(
            f"the tables in PIPELINE_DATABASE_URL={mask_url(url)} were created before migrations and do not "
            f"match revision {HEAD}; nothing was changed. Differences: {diffs}"
        )
    return before, HEAD


def _differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"include_name": include_name, "compare_type": True})
    return list(compare_metadata(context, metadata))
