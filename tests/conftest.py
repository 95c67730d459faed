"""Shared fixtures: a throwaway SQLite store for the app, fake side effects, and server checks."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.core.envelope import Envelope

# The app reads its settings once, at import: point it at a scratch database first.
_SCRATCH = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ.setdefault("PIPELINE_DATABASE_URL", f"sqlite+aiosqlite:///{_SCRATCH / 'unit.db'}")
os.environ.setdefault("PIPELINE_LOG_FORMAT", "console")

SERVICES = {"rabbitmq": ("127.0.0.1", 5672), "redis": ("127.0.0.1", 6379), "postgresql": ("127.0.0.1", 5432)}


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(*services: str) -> None:
    """Skip when a server is down; in CI (`CI=true`) that is a failure instead."""
    down = [s for s in services if not answers(*SERVICES[s])]
    if not down:
        return
    message = f"server(s) not answering: {', '.join(down)}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class RecordingRedis:
    """Stands in for the raw Redis client in memory tests: records XADDs, XACKs and scheduled retries."""

    def __init__(self) -> None:
        self.added: list[tuple[str, dict[Any, Any]]] = []
        self.acked: list[tuple[str, str, str]] = []
        self.scheduled: list[tuple[str, dict[Any, Any]]] = []

    async def xadd(self, name: str, fields: dict[Any, Any], **_: Any) -> bytes:
        self.added.append((name, dict(fields)))
        return b"0-1"

    async def xack(self, name: str, group: str, *ids: str) -> int:
        self.acked.extend((name, group, i) for i in ids)
        return len(ids)

    def pipeline(self, transaction: bool = True) -> RecordingTransaction:
        return RecordingTransaction(self)


def _b(key: Any) -> Any:
    return key.encode() if isinstance(key, str) else key


class RecordingTransaction:
    """A MULTI of RecordingRedis: commands take effect on execute()."""

    def __init__(self, redis: RecordingRedis) -> None:
        self.redis = redis
        self.commands: list[Any] = []

    async def __aenter__(self) -> RecordingTransaction:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def xadd(self, name: str, fields: dict[Any, Any], **_: Any) -> None:
        self.commands.append(lambda: self.redis.added.append((name, {_b(k): v for k, v in fields.items()})))

    def xack(self, name: str, group: str, entry_id: str) -> None:
        self.commands.append(lambda: self.redis.acked.append((name, group, entry_id)))

    def hset(self, key: str, mapping: dict[Any, Any]) -> None:
        self.commands.append(lambda: self.redis.scheduled.append((key, dict(mapping))))

    def zadd(self, key: str, mapping: dict[Any, Any]) -> None:
        self.commands.append(lambda: None)

    async def execute(self) -> list[Any]:
        for command in self.commands:
            command()
        return []


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="pipeline-") as d:
        yield Path(d)


@pytest.fixture
async def app_store() -> Any:
    """The app's event store, with its tables created."""
    from streams import app as app_module

    await app_module.store.start()
    return app_module.store


class CountingLedger:
    """The crash ledger in memory: handler runs that never returned, per message id."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.runs: list[str] = []

    async def crashes(self, env: Envelope) -> int:
        return self.counts.get(env.message_id, 0)

    async def handler_started(self, env: Envelope) -> None:
        self.runs.append(env.message_id)
        self.counts[env.message_id] = self.counts.get(env.message_id, 0) + 1

    async def handler_returned(self, env: Envelope) -> None:
        self.counts[env.message_id] -= 1
