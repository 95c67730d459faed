"""Health endpoints: `/health/live`, `/health/ready`, `/health/consumers`, all `{"status", "checks"}`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.types import Scope

from streams.ops.monitor import Monitor
from streams.policy.breaker import Breaker, State

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Consumer:
    """One subscriber as health reports it."""

    name: str  # e.g. `rabbit:email`, `redis:email:reclaim`
    subscriber: Any
    broker: str
    source: str


def _json(status_code: int, body: dict[str, Any]) -> AsgiResponse:
    return AsgiResponse(json.dumps(body).encode(), status_code, headers={"content-type": "application/json"})


async def _run(check: Check) -> bool:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception:  # noqa: BLE001 - a failing check is an unhealthy check
        return False


async def evaluate(checks: Mapping[str, Check]) -> tuple[bool, dict[str, Any]]:
    """Run every check concurrently; all must pass."""
    results = await asyncio.gather(*(_run(c) for c in checks.values()))
    named: dict[str, Any] = {name: "ok" if ok else "failing" for name, ok in zip(checks, results, strict=True)}
    return all(results), named


def report(ok: bool, checks: dict[str, Any], **extra: Any) -> AsgiResponse:
    """The shared response shape: 200 healthy or 503 unhealthy, naming each check."""
    return _json(200 if ok else 503, {"status": "healthy" if ok else "unhealthy", "checks": checks, **extra})


def running(sub: Any) -> bool:
    """True while a FastStream subscriber is consuming."""
    return bool(getattr(sub, "running", False))


def make_routes(
    ready_checks: Mapping[str, Check],
    consumers: Callable[[], Sequence[Consumer]],
    breakers: Callable[[], Mapping[str, Breaker]],
    monitor: Monitor,
    dependencies: Callable[[], Mapping[str, Mapping[str, Any]]] = dict,
) -> list[tuple[str, GetHandler]]:
    """The three health routes."""

    @get(include_in_schema=False)
    async def live(scope: Scope) -> AsgiResponse:
        """The process is up and serving HTTP."""
        return report(True, {"process": "ok"})

    @get(include_in_schema=False)
    async def ready(scope: Scope) -> AsgiResponse:
        """Brokers and database answer, no breaker is open, and every subscriber is consuming."""
        ok, named = await evaluate(ready_checks)
        subs = consumers()
        stopped = [c.name for c in subs if not running(c.subscriber)]
        named["subscribers"] = "ok" if subs and not stopped else f"failing: not consuming: {', '.join(stopped)}"
        degraded = []
        for name, breaker in breakers().items():
            status = breaker.status
            named[f"breaker:{name}"] = status.name.lower()
            if status is State.OPEN:
                degraded.append(name)
        healthy = ok and bool(subs) and not stopped and not degraded
        return report(healthy, named, degraded=degraded)

    @get(include_in_schema=False)
    async def consumer_health(scope: Scope) -> AsgiResponse:
        """Per subscriber: consuming or not, in flight, last message time, queue depth or stream lag; per
        dependency: throttled or not, calls in flight and waiting, its limits (throttled is working: still 200)."""
        checks: dict[str, Any] = {}
        for c in consumers():
            act = monitor.activity(c.broker, c.source)
            checks[c.name] = {
                "running": running(c.subscriber),
                "in_flight": act.in_flight,
                "handled": act.handled,
                "last_message_at": act.last_message_at,
                "depth": act.depth,
            }
        ok = bool(checks) and all(v["running"] for v in checks.values())
        deps = dependencies()
        throttled = sorted(name for name, state in deps.items() if state.get("throttled"))
        return report(ok, checks, dependencies=dict(deps), throttled=throttled)

    return [("/health/live", live), ("/health/ready", ready), ("/health/consumers", consumer_health)]
