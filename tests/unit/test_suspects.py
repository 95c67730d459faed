"""Isolation: first deliveries share the worker, a redelivered suspect runs alone; the ledger key."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.envelope import Envelope
from streams.suspects import CrashLedger, Isolation, ledger_key, run_counted


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
    ledger._start_calls = ledger._end_calls = cast(Any, DownRedis().register_script(""))  # its own connections
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
    import streams.suspects as suspects

    monkeypatch.setattr(suspects, "RETRY_FIRST", 0.01)
    script = FlakyScript(failures=2)
    ledger = CrashLedger(cast(Any, RestartingRedis(script)))
    ledger._end_calls = cast(Any, DownRedis().register_script(""))  # the ledger's own connection: refused
    env = Envelope(transport="redis", source="email", message_id="m1", correlation_id="c1", body=b"{}")
    await ledger.handler_returned(env)  # does not raise
    await asyncio.wait_for(script.landed.wait(), 5)
    assert script.calls == 3, "two refusals, then the decrement landed"


# --- run_counted: the handlers of a batch, each counted while it runs --------------------------------


class TurnLedger:
    """A ledger in memory that records its turns and checks what a crash would charge."""

    def __init__(self, at_once: int) -> None:
        self.at_once = at_once
        self.counts: dict[str, int] = {}
        self.turns: list[tuple[list[str], list[str]]] = []

    async def turn(self, ended: Sequence[str], started: Sequence[str]) -> None:
        await asyncio.sleep(0)  # a round trip
        self.turns.append((list(ended), list(started)))
        for key in ended:
            self.counts[key] -= 1
        for key in started:
            self.counts[key] = self.counts.get(key, 0) + 1
        assert sum(self.counts.values()) <= self.at_once, "a crash now would charge more than at_once runs"

    @property
    def counted(self) -> set[str]:
        return {key for key, n in self.counts.items() if n}


async def test_each_run_is_counted_while_it_runs_and_results_come_back_in_order() -> None:
    ledger = TurnLedger(at_once=4)
    seen_counted: list[bool] = []

    async def run(i: int) -> int:
        seen_counted.append(ledger.counts.get(f"k{i}") == 1)
        for _ in range(i % 3):  # runs of different lengths
            await asyncio.sleep(0)
        if i % 7 == 0:
            raise ValueError(f"bad {i}")
        return i * 10

    runs = [(f"k{i}", functools.partial(run, i)) for i in range(30)]
    results = await run_counted(cast(Any, ledger), runs, 4)
    assert len(seen_counted) == 30
    assert all(seen_counted), "every run was counted when it started"
    for i, result in enumerate(results):
        if i % 7 == 0:
            assert isinstance(result, ValueError)
            assert str(result) == f"bad {i}"
        else:
            assert result == i * 10
    assert ledger.counted == set(), "every run counted down before run_counted returned"
    assert len(ledger.turns) < 30, "turns shared between runs"


async def test_runs_that_arrive_together_start_after_one_call_and_end_in_one() -> None:
    ledger = TurnLedger(at_once=16)

    async def run() -> str:
        return "ok"

    results = await run_counted(cast(Any, ledger), [(f"k{i}", run) for i in range(16)], 16)
    assert results == ["ok"] * 16
    assert [(len(e), len(s)) for e, s in ledger.turns] == [(0, 16), (16, 0)]


async def test_a_slow_run_holds_up_no_other() -> None:
    ledger = TurnLedger(at_once=2)
    release = asyncio.Event()
    done: list[int] = []

    async def run(i: int) -> int:
        if i == 0:
            await release.wait()
        done.append(i)
        return i

    runner = asyncio.create_task(
        run_counted(cast(Any, ledger), [(f"k{i}", functools.partial(run, i)) for i in range(6)], 2)
    )
    for _ in range(10_000):  # turns of the loop, not time: each run and turn takes a few
        if len(done) == 5 and len(ledger.turns) == 6:
            break
        await asyncio.sleep(0)
    assert done == [1, 2, 3, 4, 5], "the others ran through the second place"
    assert ledger.counted == {"k0"}, "and were counted down while the slow one runs"
    release.set()
    assert await runner == [0, 1, 2, 3, 4, 5]
    assert ledger.counted == set()


async def test_a_cancelled_batch_stops_its_runs_and_counts_them_down() -> None:
    ledger = TurnLedger(at_once=3)
    started = asyncio.Event()
    cancelled: list[int] = []

    async def run(i: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    runner = asyncio.create_task(
        run_counted(cast(Any, ledger), [(f"k{i}", functools.partial(run, i)) for i in range(5)], 3)
    )
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0)
    assert ledger.counted == {"k0", "k1", "k2"}
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert sorted(cancelled) == [0, 1, 2], "the running ones were stopped, the rest never started"
    assert ledger.counted == set(), "and counted down"


async def test_without_a_ledger_the_runs_still_run_at_most_n_at_once() -> None:
    running = 0
    most = 0

    async def run(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        return i

    assert await run_counted(None, [(f"k{i}", functools.partial(run, i)) for i in range(20)], 5) == list(range(20))
    assert most == 5


async def test_a_turn_refused_while_redis_restarts_starts_the_runs_uncounted_and_retries_the_count_down(
    monkeypatch: Any,
) -> None:
    import streams.suspects as suspects

    monkeypatch.setattr(suspects, "RETRY_FIRST", 0.01)
    script = FlakyScript(failures=0)
    ledger = CrashLedger(cast(Any, RestartingRedis(script)))
    ledger._turn_calls = cast(Any, DownRedis().register_script(""))  # the ledger's own connection: refused
    await ledger.turn(["k-ended"], ["k-starting"])  # does not raise
    await asyncio.wait_for(script.landed.wait(), 5)
    assert script.calls == 1, "the count-down of the run that ended landed once Redis answered"
