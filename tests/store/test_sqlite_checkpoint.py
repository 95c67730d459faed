"""SQLite only: the WAL is checkpointed by the store's thread, never by a commit on the loop;
a COMMIT that fails leaves no transaction open behind it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from streams.eventstore.store import EventStore
from tests.store import sent


async def _until(predicate: object, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


def _events_in_main_file(db: Path, scratch: Path) -> int:
    """Events the database file holds by itself, without its WAL (a copy, opened alone)."""
    copy = scratch / "main-file-only.db"
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:  # not even the tables yet: all still in the WAL
        return -1
    finally:
        conn.close()


async def test_commits_leave_checkpoints_to_the_store_thread(tmp_path: Path) -> None:
    """The hot connection never checkpoints (autocheckpoint off); the thread copies the WAL into
    the database file, so committed events reach the main file without a commit doing it."""
    db = tmp_path / "store.db"
    store = EventStore(f"sqlite+aiosqlite:///{db}")
    await store.start()
    try:
        await asyncio.gather(*(store.commit(sent()) for _ in range(50)))
        async with store._hot(transaction=False) as sql:  # the connection the commits used
            autocheckpoint = sql.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]  # type: ignore[attr-defined]
        assert autocheckpoint == 0
        await _until(lambda: _events_in_main_file(db, tmp_path) == 50, 10)
        assert store._checkpointer is not None
        assert store._checkpointer.checkpoints >= 1
    finally:
        await store.close()
    assert store._checkpointer is None  # stopped with the store


async def test_the_wal_is_rewound_under_a_steady_stream_of_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits that never pause leave no moment for a passive checkpoint to rewind the WAL: once it
    outgrows its bound the writer empties it (TRUNCATE), so it stays near that bound instead of
    growing with the load (44 MB/s at 800 msg/s, and the WAL index every connection maps with it)."""
    import streams.eventstore.store as store_module

    bound = 1024 * 1024
    monkeypatch.setattr(store_module, "WAL_RESET_BYTES", bound)
    monkeypatch.setattr(store_module, "CHECKPOINT_SECONDS", 0.05)
    db = tmp_path / "store.db"
    store = EventStore(f"sqlite+aiosqlite:///{db}")
    await store.start()
    wal = f"{db}-wal"
    sizes: list[int] = []
    try:
        checkpointer = store._checkpointer
        assert checkpointer is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while loop.time() < deadline or checkpointer.rewinds < 3:  # commits without a pause
            assert loop.time() < deadline + 20, "the WAL was never emptied"
            await asyncio.gather(*(store.commit(sent()) for _ in range(20)))
            sizes.append(os.stat(wal).st_size)
    finally:
        await store.close()
    written = len(sizes) * 20 * 9_000  # about 9 kB of WAL a commit
    assert max(sizes) < 16 * bound < written, "the WAL grew with the commits instead of being emptied"


async def test_a_store_never_started_keeps_sqlite_checkpointing_itself(tmp_path: Path) -> None:
    """Command-line tools open the store without starting it: no thread, SQLite's own checkpoints."""
    db = tmp_path / "store.db"
    starter = EventStore(f"sqlite+aiosqlite:///{db}")
    await starter.start()
    await starter.close()
    store = EventStore(f"sqlite+aiosqlite:///{db}")
    try:
        async with store._hot(transaction=False) as sql:
            assert sql.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # type: ignore[attr-defined]
        assert store._checkpointer is None
    finally:
        await store.close()


class _CommitFailsOnce:
    """The store's sqlite3 connection, except that its next COMMIT fails as a full disk makes it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.failed = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


async def test_a_commit_that_fails_at_commit_is_rolled_back_and_the_next_one_writes(tmp_path: Path) -> None:
    """A failed COMMIT (a full disk) raises to the committer and leaves no transaction open:
    the unit is not written, and the store keeps writing once the disk has room."""
    store = EventStore(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await store.start()
    try:
        await store.commit(sent())  # opens the hot connection
        assert store._sqlite is not None
        failing = _CommitFailsOnce(store._sqlite)
        store._sqlite = failing  # type: ignore[assignment]
        lost = sent()
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            await store.commit(lost)
        assert failing.failed
        kept = sent()
        await store.commit(kept)
        stored = {e.metadata["message_id"] for e in await store.read()}
        assert kept.env.message_id in stored
        assert lost.env.message_id not in stored, "the failed transaction was rolled back"
    finally:
        await store.close()
