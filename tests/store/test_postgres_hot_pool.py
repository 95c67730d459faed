"""PostgreSQL only: the hot path's own asyncpg pool survives the server dropping its connections."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from streams.eventstore.store import EventStore, Outcome
from tests.store import sent
from tests.store.conftest import PG_ADMIN_DSN

pytestmark = pytest.mark.connected


async def _terminate_hot_connections(database: str) -> int:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return len(rows)
    finally:
        await admin.close()


async def test_commits_go_on_after_the_server_drops_every_connection(pg_store: EventStore) -> None:
    """As after a PostgreSQL restart: the next commits open fresh connections instead of failing."""
    assert (await pg_store.commit(sent(consumer="email"))).outcome is Outcome.COMMITTED
    database = pg_store.url.rsplit("/", 1)[1]
    assert await _terminate_hot_connections(database) >= 1
    for _ in range(5):
        assert (await pg_store.commit(sent(consumer="email"))).outcome is Outcome.COMMITTED
    assert await pg_store.seen("email", "never-seen") is False


class _HoldingProxy:
    """A TCP proxy to PostgreSQL that passes the server's bytes on but never its close.

    The client then reads the server's "terminating connection" error while idle and keeps an
    open socket: the state a pooled connection is in between those bytes and the EOF, held
    for as long as the test needs instead of one turn of the loop.
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.clients: list[asyncio.StreamWriter] = []
        self.goodbyes = 0  # server sides that ended (their last bytes passed on to the client)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.clients:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, close: bool) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            if close:
                dst.close()
            else:
                self.goodbyes += 1

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pipe(reader, up_writer, close=True), pipe(up_reader, writer, close=False))


async def test_a_connection_that_read_the_servers_goodbye_but_not_its_close_is_replaced(pg_database: str) -> None:
    """A pooled connection that got the server's FATAL error while idle fails its next query
    with InternalClientError: it is thrown away and the commit runs on a fresh connection."""
    proxy = _HoldingProxy()
    await proxy.start()
    url = pg_database.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    store = EventStore(url, owner="worker-a")
    await store.start()
    try:
        assert (await store.commit(sent(consumer="email"))).outcome is Outcome.COMMITTED
        terminated = await _terminate_hot_connections(url.rsplit("/", 1)[1])
        assert terminated >= 1
        # The goodbye reached the pooled connections before the next commit: a query sent ahead of
        # it would wait forever on a socket the proxy holds open.
        async with asyncio.timeout(10):
            while proxy.goodbyes < terminated:  # noqa: ASYNC110 - the proxy counts in this loop
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # and the client read it
        for _ in range(5):
            assert (await store.commit(sent(consumer="email"))).outcome is Outcome.COMMITTED
        assert await store.seen("email", "never-seen") is False
    finally:
        await proxy.close()  # the held closes arrive: the store's close has nothing half-open to wait on
        await store.close()
