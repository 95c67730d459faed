"""Alembic environment: async engines (aiosqlite, asyncpg), target `streams.eventstore.tables.metadata`.

`streams.eventstore.schema` runs it on a connection it already holds (`config.attributes["connection"]`);
the `alembic` command line (see alembic.ini) gets here without one and opens its own engine
on `config.attributes["url"]`, `sqlalchemy.url` or PIPELINE_DATABASE_URL, in that order.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from streams.core.settings import get_settings
from streams.eventstore.tables import metadata

config = context.config


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    return str(url) if url else get_settings().database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,  # autogenerate compares every table: use a scratch database
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite = copy and move
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():  # `alembic upgrade head --sql`: print the DDL, touch nothing
    url = _url()
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    _run(given)
else:
    asyncio.run(_run_async(_url()))
