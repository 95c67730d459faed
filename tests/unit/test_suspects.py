"""Isolation: first deliveries share the worker, a redelivered suspect runs alone; the ledger key."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError

from streams.core.envelope import Envelope
from streams.policy.suspects import CrashLedger, Isolation, ledger_key


async def test_suspect_waits_for_running_messages_and_runs_alone() -> None:
    iso = Isolation()
    log: list[str] = []
    release_a = asyncio.Event()

    async def first(name: str, gate: asyncio.Event | None = None) -> None:
        async with iso.shared():
            log.append(f"{name} start")
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(0)
            log.append(f"{name} end")

    async def suspect() -> None:
        async with iso.exclusive():
            log.append("suspect start")
            await asyncio.sleep(0.01)
            log.append("suspect end")

    a = asyncio.create_task(first("a", release_a))
    await asyncio.sleep(0)
    s = asyncio.create_task(suspect())
    await asyncio.sleep(0)
    b = asyncio.create_task(first("b"))  # arrives while the suspect waits: must wait too
    await asyncio.sleep(0.01)
    assert log == ["a start"], "the suspect waits for `a`, and `b` waits behind the suspect"
    release_a.set()
    await asyncio.wait_for(asyncio.gather(a, s, b), 2)
    assert log == ["a start", "a end", "suspect start", "suspect end", "b start", "b end"]


async def test_suspects_run_one_at_a_time_and_first_deliveries_side_by_side() -> None:
    iso = Isolation()
    running = 0
    peak = {"shared": 0, "exclusive": 0}

    async def run(kind: str) -> None:
        nonlocal running
        async with iso.exclusive() if kind == "exclusive" else iso.shared():
            running += 1
            peak[kind] = max(peak[kind], running)
            await asyncio.sleep(0.005)
            running -= 1

    await asyncio.wait_for(asyncio.gather(*(run("shared") for _ in range(5))), 2)
    await asyncio.wait_for(asyncio.gather(*(run("exclusive") for _ in range(3))), 2)
    assert peak == {"shared": 5, "exclusive": 1}
    assert iso.exclusive_waiting == 0


async def test_a_failing_suspect_releases_the_worker() -> None:
    iso = Isolation()

    async def boom() -> None:
        async with iso.exclusive():
            raise RuntimeError("handler failed")

    with contextlib.suppress(RuntimeError):
        await boom()
    async with asyncio.timeout(1), iso.shared():
        pass


def test_ledger_key_is_per_message_attempt_and_replay() -> None:
    env = Envelope(transport="rabbit", source="email", message_id="m1", correlation_id="c1", body=b"{}")
    again = Envelope(transport="rabbit", source="email", message_id="m1", correlation_id="c1", body=b"{}", attempt=2)
    replay = Envelope(
        transport="rabbit",
        source="email",
        message_id="m1",
        correlation_id="c1",
        body=b"{}",
        headers={"x-replayed-from": "7"},
    )
    keys = {ledger_key(env), ledger_key(again), ledger_key(replay)}
    assert len(keys) == 3
    assert ledger_key(env) == "pipeline:starts:rabbit:email:m1:1:"


class DownRedis:
    """A Redis client whose server is gone."""

    async def get(self, key: str) -> bytes:
        raise RedisConnectionError("Connection refused")

    def register_script(self, script: str) -> Any:
        async def run(keys: list[str], *args: Any, **kwargs: Any) -> int:
            raise RedisConnectionError("Connection refused")

        return run

    def pipeline(self, transaction: bool = True) -> Any:
        raise RedisConnectionError("Connection refused")


async def test_an_unreachable_ledger_calls_nothing_poison_and_does_not_fail_the_message() -> None:
    """Redis down: the broker's count (which charges innocent neighbours) is not used; nothing raises."""
    ledger = CrashLedger(cast(Any, DownRedis()))
    env = Envelope(transport="rabbit", source="email", message_id="m1", correlation_id="c1", body=b"{}", redeliveries=7)
    assert await ledger.crashes(env) == 0
    await ledger.handler_started(env)
    await ledger.handler_returned(env)
    await asyncio.sleep(0)
    for task in list(ledger._retries):  # the decrement retried in the background: not needed here
        task.cancel()


class FlakyScript:
    """A Lua script call that fails while Redis restarts, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.landed = asyncio.Event()

    async def __call__(self, keys: list[str], args: list[Any] | None = None) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise RedisConnectionError("Connection refused")
        self.landed.set()
        return 0


class RestartingRedis:
    def __init__(self, script: FlakyScript) -> None:
        self.script = script

    def register_script(self, source: str) -> FlakyScript:
        return self.script


async def test_a_decrement_refused_during_a_redis_restart_is_retried(monkeypatch: Any) -> None:
    """A run that ended while Redis restarted is uncounted once Redis is back, not left as a crash."""
    import streams.policy.suspects as suspects

    monkeypatch.setattr(suspects, "RETRY_FIRST", 0.01)
    script = FlakyScript(failures=2)
    ledger = CrashLedger(cast(Any, RestartingRedis(script)))
    env = Envelope(transport="redis", source="email", message_id="m1", correlation_id="c1", body=b"{}")
    await ledger.handler_returned(env)  # does not raise
    await asyncio.wait_for(script.landed.wait(), 5)
    assert script.calls == 3, "two refusals, then the decrement landed"
