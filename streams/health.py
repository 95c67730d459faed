"""Health endpoints: `/health/live`, `/health/ready`, `/health/consumers`, all `{"status", "checks"}`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.types import Scope

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT = 3.0


def _json(status_code: int, body: dict[str, Any]) -> AsgiResponse:
    return AsgiResponse(json.dumps(body).encode(), status_code, headers={"content-type": "application/json"})


async def _run(check: Check) -> bool:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception:  # noqa: BLE001 - a failing check is an unhealthy check
        return False


async def evaluate(checks: dict[str, Check]) -> tuple[bool, dict[str, str]]:
    """Run every check concurrently; all must pass."""
    results = await asyncio.gather(*(_run(c) for c in checks.values()))
    named = {name: "ok" if ok else "failing" for name, ok in zip(checks, results, strict=True)}
    return all(results), named


def report(ok: bool, checks: dict[str, Any]) -> AsgiResponse:
    """The shared response shape: 200 healthy or 503 unhealthy, naming each check."""
    return _json(200 if ok else 503, {"status": "healthy" if ok else "unhealthy", "checks": checks})


def subscriber_running(sub: Any) -> bool:
    """True while a FastStream subscriber is consuming."""
    return bool(getattr(sub, "running", False))


def make_routes(
    ready_checks: dict[str, Check], subscribers: Callable[[], Sequence[tuple[str, Any]]]
) -> list[tuple[str, GetHandler]]:
    """The three health routes."""

    @get(include_in_schema=False)
    async def live(scope: Scope) -> AsgiResponse:
        """The process is up and serving HTTP."""
        return report(True, {"process": "ok"})

    @get(include_in_schema=False)
    async def ready(scope: Scope) -> AsgiResponse:
        """Brokers and database answer and every subscriber is consuming."""
        ok, named = await evaluate(ready_checks)
        subs = subscribers()
        running = all(subscriber_running(s) for _, s in subs)
        named["subscribers"] = "ok" if subs and running else "failing"
        return report(ok and running and bool(subs), named)

    @get(include_in_schema=False)
    async def consumers(scope: Scope) -> AsgiResponse:
        """One check per subscriber: is it consuming."""
        checks = {name: {"running": subscriber_running(s)} for name, s in subscribers()}
        ok = bool(checks) and all(c["running"] for c in checks.values())
        return report(ok, checks)

    return [("/health/live", live), ("/health/ready", ready), ("/health/consumers", consumers)]
