"""Schema migrations on a scratch SQLite file: upgrade makes exactly `streams.eventstore.tables`, check, CLI."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from handlers.errors import PipelineError
from streams.cli.db import db_app
from streams.core.settings import get_settings
from streams.eventstore import schema
from streams.eventstore.schema import HEAD, SchemaOutdatedError
from streams.eventstore.tables import events, metadata

runner = CliRunner()
SECRET_URL = "postgresql+asyncpg://u:secret@h/db"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "schema.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite+aiosqlite:///{db_path}"


async def on_db(url: str, work: Any) -> Any:
    """Run a sync function on a connection to the database (committed)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await engine.dispose()


def differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"include_name": schema.include_name, "compare_type": True})
    return list(compare_metadata(context, metadata))


def table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def shape(conn: Connection) -> dict[str, Any]:
    """Indexes, unique constraints and primary keys of the pipeline's tables, as reflected."""
    insp = inspect(conn)
    return {
        name: (
            {(ix["name"], tuple(ix["column_names"]), bool(ix["unique"])) for ix in insp.get_indexes(name)},
            {tuple(uc["column_names"]) for uc in insp.get_unique_constraints(name)},
            tuple(insp.get_pk_constraint(name)["constrained_columns"]),
        )
        for name in metadata.tables
    }


def expected_shape() -> dict[str, Any]:
    from sqlalchemy import UniqueConstraint

    result: dict[str, Any] = {}
    for name, table in metadata.tables.items():
        indexes = {(ix.name, tuple(c.name for c in ix.columns), bool(ix.unique)) for ix in table.indexes}
        uniques = {tuple(c.name for c in uc.columns) for uc in table.constraints if isinstance(uc, UniqueConstraint)}
        uniques |= {(c.name,) for c in table.columns if c.unique}
        result[name] = (indexes, uniques, tuple(c.name for c in table.primary_key.columns))
    return result


# -- upgrade --------------------------------------------------------------------------------


async def test_upgrade_creates_exactly_what_tables_defines(url: str) -> None:
    await schema.upgrade(url)

    assert await on_db(url, table_names) == set(metadata.tables) | {"alembic_version"}
    assert await on_db(url, differences) == []
    assert await on_db(url, shape) == expected_shape()


async def test_positions_autoincrement(url: str) -> None:
    await schema.upgrade(url)
    row = {
        "stream_id": "task-1",
        "type": "completion.requested",
        "data": {},
        "metadata": {},
        "recorded_at": datetime.now(UTC),
    }

    def append(conn: Connection) -> list[int]:
        for version in (1, 2):
            conn.execute(insert(events).values(**row, version=version, event_id=f"e{version}"))
        return list(conn.scalars(select(events.c.position).order_by(events.c.position)))

    assert await on_db(url, append) == [1, 2]


async def test_upgrade_is_idempotent_and_keeps_data(url: str) -> None:
    assert await schema.migrate(url) == (None, HEAD)
    await on_db(url, lambda c: c.execute(text("INSERT INTO inbox VALUES ('email', 'm-1', '2025-01-01')")))

    assert await schema.migrate(url) == (HEAD, HEAD)
    await schema.upgrade(url)

    assert await on_db(url, lambda c: c.execute(text("SELECT count(*) FROM inbox")).scalar()) == 1
    assert await schema.current_revision(url) == HEAD


async def test_concurrent_upgrades_queue_up(url: str) -> None:
    await asyncio.gather(*(schema.upgrade(url) for _ in range(4)))

    assert await schema.current_revision(url) == HEAD
    assert await on_db(url, differences) == []


def test_downgrade_to_base_and_back(db_path: Path, url: str) -> None:
    engine = create_engine(f"sqlite:///{db_path}")
    config = schema.alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        assert table_names(conn) == {"alembic_version"}
        command.upgrade(config, "head")
        assert differences(conn) == []
    engine.dispose()
    assert asyncio.run(schema.current_revision(url)) == HEAD


# -- revision and check ------------------------------------------------------------------------


async def test_current_revision_of_a_missing_file_is_none_and_creates_nothing(db_path: Path, url: str) -> None:
    assert await schema.current_revision(url) is None
    assert not await asyncio.to_thread(db_path.exists)


async def test_current_revision_after_upgrade_is_head(url: str) -> None:
    await schema.upgrade(url)
    assert await schema.current_revision(url) == HEAD
    assert HEAD == ScriptDirectory.from_config(schema.alembic_config()).get_current_head() == "0001"


async def test_check_on_an_empty_database_names_the_command(db_path: Path, url: str) -> None:
    await asyncio.to_thread(db_path.touch)  # an existing, empty database
    with pytest.raises(SchemaOutdatedError, match="pipeline db upgrade") as caught:
        await schema.check(url)
    assert isinstance(caught.value, PipelineError)
    assert f"the code needs {HEAD}" in str(caught.value)
    assert "revision none" in str(caught.value)


async def test_check_passes_after_upgrade(url: str) -> None:
    await schema.upgrade(url)
    await schema.check(url)


def test_outdated_message_is_exact_and_masks_the_password() -> None:
    message = schema.outdated_message("0001", SECRET_URL, head="0002")
    assert message == (
        "database schema is at revision 0001, the code needs 0002: run `pipeline db upgrade` "
        "(PIPELINE_DATABASE_URL=postgresql+asyncpg://u:***@h/db)"
    )
    empty = schema.outdated_message(None, SECRET_URL)
    assert "secret" not in empty
    assert "pipeline db upgrade" in empty
    assert f"the code needs {HEAD}" in empty


def test_a_revision_from_a_newer_release_is_not_sent_to_upgrade() -> None:
    message = schema.outdated_message("9999_future", SECRET_URL)
    assert "newer release" in message
    assert "pipeline db upgrade" not in message
    assert "secret" not in message


async def test_a_database_from_a_newer_release_is_refused_untouched(url: str) -> None:
    def stamp_future(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('9999_future')"))

    await on_db(url, stamp_future)
    with pytest.raises(SchemaOutdatedError, match="newer release"):
        await schema.check(url)
    with pytest.raises(SchemaOutdatedError, match="newer release"):
        await schema.upgrade(url)
    assert await on_db(url, table_names) == {"alembic_version"}


# -- prepare (worker start-up) --------------------------------------------------------------------


async def test_prepare_without_auto_upgrade_only_checks(db_path: Path, url: str) -> None:
    with pytest.raises(SchemaOutdatedError, match="pipeline db upgrade"):
        await schema.prepare(url, auto_upgrade=False)
    assert not await asyncio.to_thread(db_path.exists)


async def test_prepare_with_auto_upgrade_upgrades(url: str) -> None:
    await schema.prepare(url, auto_upgrade=True)
    await schema.prepare(url, auto_upgrade=False)
    assert await schema.current_revision(url) == HEAD


# -- databases from before migrations ----------------------------------------------------------------


async def test_tables_from_create_all_are_adopted(url: str) -> None:
    """What `EventStore.start(create=True)` made: every table, no alembic_version."""
    await on_db(url, metadata.create_all)
    await on_db(url, lambda c: c.execute(text("INSERT INTO inbox VALUES ('email', 'm-1', '2025-01-01')")))

    assert await schema.migrate(url) == (None, HEAD)

    assert await on_db(url, differences) == []
    assert await on_db(url, lambda c: c.execute(text("SELECT count(*) FROM inbox")).scalar()) == 1


async def test_the_released_schema_is_adopted_and_completed(url: str) -> None:
    """The last release before migrations had only `events` and `dead_letters`."""
    legacy = MetaData()
    for name in ("events", "dead_letters"):
        metadata.tables[name].to_metadata(legacy)
    await on_db(url, legacy.create_all)

    await schema.upgrade(url)

    assert await on_db(url, table_names) == set(metadata.tables) | {"alembic_version"}
    assert await on_db(url, differences) == []


async def test_tables_that_do_not_match_are_not_adopted_and_nothing_changes(url: str) -> None:
    odd = MetaData()
    Table("events", odd, Column("position", Integer, primary_key=True), Column("stream_id", String(10)))
    await on_db(url, odd.create_all)

    with pytest.raises(SchemaOutdatedError, match="created before migrations") as caught:
        await schema.upgrade(url)

    assert "nothing was changed" in str(caught.value)
    assert await on_db(url, table_names) == {"events"}  # the whole upgrade was rolled back
    assert await schema.current_revision(url) is None


# -- CLI: pipeline db ... ----------------------------------------------------------------------------


def test_cli_current_on_an_empty_database_exits_1(url: str) -> None:
    result = runner.invoke(db_app, ["current", "--url", url])
    assert result.exit_code == 1
    assert "none (empty database): outdated" in result.stdout
    assert "pipeline db upgrade" in result.stderr


def test_cli_upgrade_prints_from_and_to_then_current_is_up_to_date(url: str) -> None:
    first = runner.invoke(db_app, ["upgrade", "--url", url])
    assert first.exit_code == 0, first.output
    assert f"upgraded from revision none (empty database) to {HEAD}" in first.stdout

    again = runner.invoke(db_app, ["upgrade", "--url", url])
    assert again.exit_code == 0, again.output
    assert f"already at revision {HEAD}" in again.stdout

    current = runner.invoke(db_app, ["current", "--url", url])
    assert current.exit_code == 0, current.output
    assert current.stdout.strip() == f"{HEAD} (head): up to date"


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.chdir(tmp_path)  # no .env
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_cli_takes_the_url_from_settings(settings_env: pytest.MonkeyPatch, url: str) -> None:
    settings_env.setenv("PIPELINE_DATABASE_URL", url)
    assert runner.invoke(db_app, ["upgrade"]).exit_code == 0
    assert asyncio.run(schema.current_revision(url)) == HEAD


def test_cli_invalid_settings_exit_2(settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("PIPELINE_DATABASE_URL", "mysql://u:secret@h/db")
    result = runner.invoke(db_app, ["current"])
    assert result.exit_code == 2
    assert "invalid settings" in result.stderr


def test_cli_rejects_a_sync_driver_url(db_path: Path) -> None:
    result = runner.invoke(db_app, ["upgrade", "--url", f"sqlite:///{db_path}"])
    assert result.exit_code == 2
    assert not db_path.exists()


def test_cli_unreachable_database_exits_1_without_the_password() -> None:
    result = runner.invoke(db_app, ["current", "--url", "postgresql+asyncpg://u:secret@127.0.0.1:1/db"])
    assert result.exit_code == 1
    assert "database unavailable (postgresql+asyncpg://u:***@127.0.0.1:1/db)" in result.stderr
    assert "secret" not in result.output


def test_cli_without_a_command_shows_help() -> None:
    result = runner.invoke(db_app, [])
    assert "upgrade" in result.output
    assert "current" in result.output
