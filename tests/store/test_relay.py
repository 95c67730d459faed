"""The outbox relay against a fake broker, on SQLite and PostgreSQL: order, outages, exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from faststream.message import StreamMessage
from sqlalchemy import select, update

from streams.core.envelope import Envelope, Transport
from streams.eventstore import store as store_module
from streams.eventstore.relay import EventPublisher, Relay
from streams.eventstore.store import Commit, ConcurrencyError, EventStore, PendingEvent
from streams.eventstore.tables import outbox
from tests.store import envelope, new_id, sent

WAIT = 10.0  # seconds: a safety bound on conditions, never an expectation of speed


class BrokerDownError(ConnectionError):
    """Raised by the fake broker while it is down."""


@dataclass(frozen=True)
class Published:
    """One event the fake broker accepted."""

    transport: Transport
    event_type: str
    event_id: str
    message_id: str
    correlation_id: str
    payload: bytes


@dataclass
class FakeBroker:
    """Accepts publishes in order; attempts numbered in `down_for` (1-based) fail as if it were down."""

    down_for: Collection[int] = ()
    # Runs at the start of each attempt, with its number: lets a test script an interleaving.
    on_attempt: Callable[[int], Awaitable[None]] | None = None
    attempts: int = 0
    log: list[Published] = field(default_factory=list)

    def outlets(self) -> dict[Transport, EventPublisher]:
        """One outlet per transport, both publishing here."""
        return {"rabbit": FakeOutlet("rabbit", self), "redis": FakeOutlet("redis", self)}

    @property
    def event_ids(self) -> list[str]:
        return [p.event_id for p in self.log]


class FakeOutlet:
    """An Outlet whose only working part is `publish_event`, the one the relay uses."""

    def __init__(self, transport: Transport, broker: FakeBroker) -> None:
        self.transport: Transport = transport
        self.broker = broker

    def envelope(self, msg: StreamMessage[Any], source: str) -> Envelope:
        raise NotImplementedError

    async def publish_event(
        self, event_type: str, event_id: str, message_id: str, correlation_id: str, payload: bytes
    ) -> None:
        broker = self.broker
        broker.attempts += 1
        attempt = broker.attempts
        if broker.on_attempt is not None:
            await broker.on_attempt(attempt)
        if attempt in broker.down_for:
            raise BrokerDownError(f"publish attempt {attempt}: connection refused")
        broker.log.append(Published(self.transport, event_type, event_id, message_id, correlation_id, payload))

    async def publish_events(self, rows: Sequence[PendingEvent]) -> None:
        """Publish a run of rows in order, like a broker: the first failure ends the run."""
        for row in rows:
            await self.publish_event(row.event_type, row.event_id, row.message_id, row.correlation_id, row.payload)

    async def dead_letter(self, env: Envelope, headers: dict[str, str]) -> None:
        raise NotImplementedError

    async def retry_later(self, env: Envelope, delay: float, headers: dict[str, str]) -> None:
        raise NotImplementedError


async def commit_events(store: EventStore, n: int, *, both: bool = False) -> list[str]:
    """Commit `n` published events (for RabbitMQ, or `both` brokers in turn); returns their ids in commit order."""
    ids: list[str] = []
    for i in range(n):
        unit = sent(env=envelope(transport="rabbit" if i % 2 or not both else "redis"))
        await store.commit(unit)
        ids.append(unit.events[0].event_id)
    return ids


async def eventually(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Wait until `predicate()` holds (checked every 10 ms), or fail after WAIT seconds."""

    async def poll() -> None:
        while not await predicate():  # noqa: ASYNC110 - the condition lives in the database: nothing to await
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)


async def test_relay_publishes_in_outbox_order(store: EventStore) -> None:
    """relay_once publishes every pending row through its outlet, each broker's oldest first, and marks it."""
    ids = await commit_events(store, 6, both=True)
    pending = await store.unpublished()
    assert len({r.transport for r in pending}) == 2  # both brokers' rows, interleaved
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())

    assert await relay.relay_once() == 6

    assert sorted(broker.event_ids) == sorted(ids)
    for transport in ("rabbit", "redis"):
        assert [
            (p.event_type, p.message_id, p.correlation_id, p.payload) for p in broker.log if p.transport == transport
        ] == [(r.event_type, r.message_id, r.correlation_id, r.payload) for r in pending if r.transport == transport]
    assert await store.unpublished() == []
    assert await store.outbox_backlog() == (0, 0.0)
    assert relay.published == 6


async def test_outage_marks_nothing_and_loses_nothing(store: EventStore) -> None:
    """While the broker is down nothing is marked or lost; after recovery all goes out once, in order."""
    ids = await commit_events(store, 5)
    broker = FakeBroker(down_for=range(1, 4))
    relay = Relay(store, broker.outlets())

    for _ in range(3):
        with pytest.raises(BrokerDownError):
            await relay.relay_once()
        assert broker.log == []
        assert [p.event_id for p in await store.unpublished()] == ids
        assert (await store.outbox_backlog())[0] == 5

    assert await relay.relay_once() == 5
    assert broker.event_ids == ids
    assert await relay.relay_once() == 0
    assert broker.event_ids == ids


async def test_failure_mid_batch_publishes_the_run_again_in_order(store: EventStore) -> None:
    """When a broker fails mid-run, the run stays unmarked and goes out again whole, in order: at least
    once (a broker's confirms do not say which of a failed run arrived; consumers dedupe on event_id)."""
    ids = await commit_events(store, 5)
    broker = FakeBroker(down_for={3})
    relay = Relay(store, broker.outlets())

    with pytest.raises(BrokerDownError):
        await relay.relay_once()
    assert broker.event_ids == ids[:2]
    assert [p.event_id for p in await store.unpublished()] == ids

    assert await relay.relay_once() == 5
    assert broker.event_ids == ids[:2] + ids
    assert await store.unpublished() == []


async def test_flush_drains_the_outbox(store: EventStore) -> None:
    """flush() relays batch after batch until nothing is pending, including an exactly full last batch."""
    broker = FakeBroker()
    relay = Relay(store, broker.outlets(), batch=3)
    ids = await commit_events(store, 7)

    await relay.flush()
    assert broker.event_ids == ids
    assert await store.unpublished() == []

    ids += await commit_events(store, 6)
    await relay.flush()
    assert broker.event_ids == ids
    assert await store.outbox_backlog() == (0, 0.0)
    assert relay.published == 13


async def test_published_rows_are_not_published_again(store: EventStore) -> None:
    """A second relay_once publishes only what was committed since the first."""
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    ids = await commit_events(store, 3)
    assert await relay.relay_once() == 3

    assert await relay.relay_once() == 0
    assert broker.event_ids == ids
    more = await commit_events(store, 2)
    assert await relay.relay_once() == 2
    assert broker.event_ids == ids + more


async def test_another_workers_orphaned_rows_are_relayed_once(store: EventStore) -> None:
    """A relay takes over another worker's rows only after `orphaned_after`, and they go out once."""
    other = EventStore(store.url, owner="worker-b")
    await other.start(create=False)
    try:
        broker = FakeBroker()
        theirs = Relay(other, broker.outlets(), orphaned_after=30)
        ids = await commit_events(store, 3)

        assert await theirs.relay_once() == 0
        async with store.engine.begin() as conn:
            await conn.execute(update(outbox).values(created_at=datetime.now(UTC) - timedelta(seconds=60)))
        assert await theirs.relay_once() == 3
        assert await Relay(store, broker.outlets()).relay_once() == 0
        assert broker.event_ids == ids
    finally:
        await other.close()


async def test_background_relay_delivers_through_an_outage(store: EventStore) -> None:
    """The started relay keeps retrying while the broker is down, then delivers everything, in order.

    At least once: a batch whose publish raised may have reached the broker in part and goes out
    again (consumers dedupe on the event id), so the order is of first deliveries."""
    broker = FakeBroker(down_for=range(1, 6))
    relay = Relay(store, broker.outlets(), interval=0.01)
    relay.start()
    try:
        ids = await commit_events(store, 4)
        relay.kick()

        async def delivered() -> bool:
            return len(broker.log) >= 4 and not await store.unpublished()

        await eventually(delivered)
    finally:
        await relay.stop()
    assert broker.attempts > 5
    assert list(dict.fromkeys(broker.event_ids)) == ids


async def test_stop_during_an_outage_stops_and_keeps_the_rows(store: EventStore) -> None:
    """stop() while the broker is down gives up flushing, stops the background task, and keeps the rows."""
    broker = FakeBroker(down_for=range(1, 1_000_000))
    relay = Relay(store, broker.outlets(), interval=3600)
    relay.start()
    ids = await commit_events(store, 2)
    try:
        await relay.stop(flush_timeout=WAIT)
        assert relay._task is None
        assert [p.event_id for p in await store.unpublished()] == ids
    finally:
        task = relay._task
        if task is not None:  # what stop() should have done
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_stop_while_a_batch_is_in_flight_publishes_each_row_once(store: EventStore) -> None:
    """stop() during a background batch (its first publish awaiting the broker) publishes every row once."""
    in_flight, confirmed = asyncio.Event(), asyncio.Event()

    async def script(attempt: int) -> None:
        if attempt == 1:  # the background batch's first publish waits for the broker...
            in_flight.set()
            await confirmed.wait()
        elif attempt == 2:  # ...whose confirm arrives while stop() is flushing
            confirmed.set()

    broker = FakeBroker(on_attempt=script)
    relay = Relay(store, broker.outlets(), interval=3600)
    ids = await commit_events(store, 3)
    relay.start()
    relay.kick()
    await asyncio.wait_for(in_flight.wait(), WAIT)

    await relay.stop(flush_timeout=WAIT)

    assert await store.unpublished() == []
    assert broker.event_ids == ids


# --- from memory: the rows the store commits go out without reading the outbox table -----------


class CountingStore:
    """Counts the relay's reads of the outbox table."""

    def __init__(self, store: EventStore) -> None:
        self.reads = 0
        original = store.unpublished

        async def unpublished(*, limit: int = 500) -> list[PendingEvent]:
            self.reads += 1
            return await original(limit=limit)

        store.unpublished = unpublished  # type: ignore[method-assign]


async def test_committed_rows_go_out_from_memory_in_commit_order(store: EventStore) -> None:
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    assert await relay.relay_once() == 0  # the first pass reads the table once: rows from before
    reads = CountingStore(store)
    ids = await commit_events(store, 6)
    assert await relay.relay_once() == 6
    assert broker.event_ids == ids
    assert reads.reads == 0, "published from memory, not read back"
    assert await store.unpublished() == [], "and marked published"
    assert await relay.relay_once() == 0
    assert broker.event_ids == ids, "nothing twice"


async def test_a_failed_publish_from_memory_is_read_back_in_order_before_newer_rows(store: EventStore) -> None:
    broker = FakeBroker(down_for={3})
    relay = Relay(store, broker.outlets())
    relay.listen()
    await relay.relay_once()
    first = await commit_events(store, 4)
    with pytest.raises(BrokerDownError):
        await relay.relay_once()
    assert broker.event_ids == first[:2]
    later = await commit_events(store, 2)
    await relay.flush()
    assert broker.event_ids == first[:2] + first + later, "the failed run again, whole, before the newer rows"
    assert await store.unpublished() == []


async def test_a_table_read_leaves_rows_being_committed_to_memory(store: EventStore) -> None:
    """A row reserved (its transaction not yet committed) or waiting in memory is not read from the table."""
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    ids = await commit_events(store, 3)  # in memory now
    relay._scan = True  # as after taking over another worker's rows
    assert await relay.relay_once(claim=False) == 3  # the table read found only held rows; memory went
    assert broker.event_ids == ids, "each once"


async def test_flush_publishes_memory_and_table(store: EventStore) -> None:
    broker = FakeBroker()
    relay = Relay(store, broker.outlets(), batch=2)
    ids = await commit_events(store, 3)  # before listening: only in the table
    relay.listen()
    ids += await commit_events(store, 3)  # in memory
    await relay.flush()
    assert broker.event_ids == ids
    assert await store.unpublished() == []


# -- marking published rows in the next group commit ------------------------------------------


async def unmarked_in_table(store: EventStore, event_ids: Collection[str]) -> set[str]:
    """Which of these event ids the outbox table still holds as unpublished (read past the store)."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(outbox.c.event_id).where(outbox.c.published_at.is_(None), outbox.c.event_id.in_(list(event_ids)))
        )
        return {r[0] for r in rows}


async def test_published_rows_are_marked_in_the_next_group_commit(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay's marks ride along in the next commit's transaction: no transaction of their own."""
    monkeypatch.setattr(store_module, "MARK_DELAY", 60.0)  # no mark on their own during the test
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    ids = await commit_events(store, 3)
    alone: list[Sequence[str]] = []

    async def mark_alone(event_ids: Sequence[str]) -> None:
        if event_ids:
            alone.append(event_ids)

    monkeypatch.setattr(store, "mark_published", mark_alone)
    await relay.relay_once(claim=False)
    assert broker.event_ids == ids
    assert await unmarked_in_table(store, ids) == set(ids), "held for the next commit"
    await store.commit(sent())
    assert await unmarked_in_table(store, ids) == set(), "which marked them"
    assert alone == [], "in its own transaction"
    assert await relay.relay_once() == 1
    assert len(broker.log) == 4, "the new row only: nothing twice"


async def test_without_a_commit_published_rows_are_marked_on_their_own(store: EventStore) -> None:
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    ids = await commit_events(store, 2)
    await relay.relay_once(claim=False)

    async def marked() -> bool:
        return not await unmarked_in_table(store, ids)

    await eventually(marked)  # within MARK_DELAY of the publish, bounded here by WAIT


async def test_reads_of_the_outbox_never_see_published_rows_as_waiting(store: EventStore) -> None:
    """`unpublished` (the relay's table read) and the backlog gauge mark held rows first."""
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    ids = await commit_events(store, 3)
    await relay.relay_once(claim=False)
    assert await store.outbox_backlog() == (0, 0.0)
    await store.mark_published_soon([])  # nothing to hold
    later = await commit_events(store, 1)
    relay._scan = True  # a table read next, as after a failure or a takeover
    await relay.relay_once(claim=False)
    assert await store.unpublished() == []
    assert broker.event_ids == ids + later, "each once"


async def test_a_failed_commit_keeps_the_marks_it_carried(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marks of a transaction that rolled back are not lost: the next one writes them."""
    monkeypatch.setattr(store_module, "MARK_DELAY", 60.0)
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    clash = sent()
    await store.commit(clash)
    ids = [clash.events[0].event_id, *await commit_events(store, 2)]
    await relay.relay_once(claim=False)
    again = Commit(f"email-{new_id()}", clash.events, clash.env)  # the same event id: a unique violation
    with pytest.raises(ConcurrencyError):
        await store.commit(again)
    assert await unmarked_in_table(store, ids) == set(ids), "rolled back with the failed commit"
    await store.commit(sent())
    assert await unmarked_in_table(store, ids) == set()


async def test_closing_the_store_marks_what_it_holds(store_url: str) -> None:
    store = EventStore(store_url)
    await store.start()
    broker = FakeBroker()
    relay = Relay(store, broker.outlets())
    relay.listen()
    ids = await commit_events(store, 2)
    await relay.relay_once(claim=False)
    await store.close()
    reopened = EventStore(store_url)
    await reopened.start()
    try:
        assert await unmarked_in_table(reopened, ids) == set()
    finally:
        await reopened.close()


async def test_one_broker_down_does_not_hold_back_the_other(store: EventStore) -> None:
    """Rows of both brokers in one batch: the one that is up publishes and marks its rows; the other's
    stay in the table and go out later, in their order, once each."""
    ids = await commit_events(store, 6, both=True)
    transport_of = {r.event_id: r.transport for r in await store.unpublished()}
    broker = FakeBroker()
    outlets = broker.outlets()
    redis_down = FakeBroker(down_for=range(1, 100))
    outlets["redis"] = FakeOutlet("redis", redis_down)
    relay = Relay(store, outlets)

    with pytest.raises(BrokerDownError):
        await relay.relay_once()
    rabbit_ids = [i for i in ids if transport_of[i] == "rabbit"]
    redis_ids = [i for i in ids if transport_of[i] == "redis"]
    assert broker.event_ids == rabbit_ids
    await store.flush_marks()
    assert await unmarked_in_table(store, ids) == set(redis_ids)

    outlets["redis"] = FakeOutlet("redis", broker)  # back
    assert await relay.relay_once() == len(redis_ids)
    assert broker.event_ids == rabbit_ids + redis_ids
    assert await store.unpublished() == []


async def test_committers_wait_while_too_many_outcomes_wait_in_memory(store: EventStore) -> None:
    """Beyond `max_ready` committed rows waiting in memory, `room()` holds the committer until the relay
    took them: a relay slower than the handlers leaves the backlog in the broker, not in memory."""
    gate = asyncio.Event()

    async def hold(attempt: int) -> None:
        await gate.wait()

    broker = FakeBroker(on_attempt=hold)
    relay = Relay(store, broker.outlets(), max_ready=3)
    relay.listen()
    relay.start()
    try:
        first = await commit_events(store, 3)
        relay.kick()
        await eventually(lambda: _true(broker.attempts >= 1))  # the relay took them and is stuck publishing
        later = await commit_events(store, 3)
        waiting = asyncio.create_task(relay.room())
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done, "room() returned with max_ready rows waiting and the relay stuck"
        gate.set()
        await asyncio.wait_for(waiting, WAIT)
        await relay.flush()
        assert broker.event_ids == first + later
    finally:
        gate.set()
        await relay.stop()


async def _true(value: bool) -> bool:
    return value
