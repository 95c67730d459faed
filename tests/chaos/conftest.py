"""Chaos tier: private RabbitMQ and Redis servers, supervised workers, faults on a seeded timeline.

Every test here is marked `chaos` (run by `make chaos`, excluded from `make check`), except the
ones a module marks `chaos_exempt`-style by living in `test_settings_tls.py`: plain settings
checks that need no server.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

UNMARKED = ("test_settings_tls.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if "tests/chaos/" in path and not path.endswith(UNMARKED):
            item.add_marker(pytest.mark.chaos)


def chaos_seed() -> int:
    """`CHAOS_SEED` from the environment, else a fresh random one (printed by the tests)."""
    raw = os.environ.get("CHAOS_SEED", "").strip()
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


@pytest.fixture(scope="session")
def seed() -> int:
    value = chaos_seed()
    print(f"\nCHAOS_SEED={value}")
    return value


@pytest.fixture(scope="session")
def servers_installed() -> None:
    """Skip (fail in CI) when the servers this tier starts privately are not installed."""
    missing = [b for b in ("rabbitmq-server", "rabbitmqctl", "redis-server") if shutil.which(b) is None]
    if not missing:
        return
    message = f"not installed: {', '.join(missing)}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
