"""`tests/conftest.py`: the app for in-memory tests, its event store on a scratch SQLite file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

# The app reads its settings once, when `streams.app` is first imported: point it at a scratch
# database before any test imports it.
_SCRATCH = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ.setdefault("PIPELINE_DATABASE_URL", f"sqlite+aiosqlite:///{_SCRATCH / 'unit.db'}")


@pytest.fixture
async def app(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`streams.app` with its event store's tables created, and no crash ledger (it lives in Redis)."""
    from streams import app  # noqa: PLC0415 - imported once the scratch database is set

    monkeypatch.setattr(app.pipeline, "crashes", None)  # the broker's delivery count decides what is poison
    await app.store.start()
    return app
