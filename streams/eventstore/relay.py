"""The outbox relay: publishes committed outcome events, in order, and marks them published.

The relay is the only publisher of outcome events. The store hands it the rows it commits
(`listen`): they go out from memory, with their confirms awaited together, and are then marked;
the table is read only for rows from before, rows taken over, and rows a failed publish left
behind (before newer ones, so the order holds). A commit kicks it; it also wakes every
`interval` to pick up what a broker outage held back, and rows other workers left behind when
they died (after `orphaned_after`). While a broker is down the rows wait in the database; once it
is back they go out oldest first. Rows of a dead worker are taken over by one relay, atomically
(`EventStore.claim_orphans`), so they are not published by every relay that sees them. A crash
between publishing and marking republishes those events once: consumers dedupe on `event_id`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from streams.core import faults, metrics
from streams.core.envelope import Transport
from streams.core.logging import get_logger
from streams.core.periodic import cancel_and_wait
from streams.eventstore.store import EventStore, PendingEvent

log = get_logger("pipeline.relay")


class EventPublisher(Protocol):
    """The part of an outlet the relay needs."""

    async def publish_events(self, rows: Sequence[PendingEvent]) -> None:
        """Publish outcome events in this order, all confirmed, or raise."""
        ...


class Relay:
    """Moves outbox rows to their brokers: from memory as they are committed, else from the table."""

    def __init__(
        self,
        store: EventStore,
        outlets: Mapping[Transport, EventPublisher],
        *,
        batch: int = 500,
        interval: float = 1.0,
        orphaned_after: float = 30.0,
        max_ready: int = 2_000,
    ) -> None:
        self.store = store
        self.outlets = outlets
        self.batch = batch
        self.interval = interval
        self.orphaned_after = orphaned_after
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one batch at a time: two would read and publish the same rows
        self.published = 0
        self._claimed_at = float("-inf")
        self._stopping = False
        # Rows the store told us of (`listen`): committed ones wait in `_ready`, in commit order;
        # `_held` has every event id reserved or waiting, which a table read must leave alone.
        self._listening = False
        self._held: set[str] = set()
        self._ready: list[PendingEvent] = []
        self._scan = True  # read the table next: rows from before, taken over, or left by a failure
        # Committed rows waiting in memory, at most: beyond it, `room` holds the committers back, so a
        # relay slower than the handlers leaves the backlog in the broker, not in this process.
        self.max_ready = max_ready
        self._room = asyncio.Event()
        self._room.set()

    def listen(self) -> None:
        """Publish what this relay's store commits from memory (the table is read only when needed)."""
        self.store.listen(self)
        self._listening = True

    # -- OutboxListener -------------------------------------------------------------------

    def reserve(self, rows: Sequence[PendingEvent]) -> None:
        """About to be committed: a table read must not take them."""
        self._held.update(r.event_id for r in rows)

    def committed(self, rows: Sequence[PendingEvent]) -> None:
        """Committed: publish them soon, from memory.

        Not a kick: whoever committed kicks (`Pipeline.run`, a dead letter) once its commit is done."""
        self._ready.extend(rows)
        if len(self._ready) >= self.max_ready:
            self._room.clear()

    async def room(self) -> None:
        """Wait while more committed rows wait in memory than `max_ready` (and the relay runs to take them)."""
        if self._room.is_set() or self._task is None or self._task.done():
            return
        self.kick()
        await self._room.wait()

    def _ready_taken(self) -> None:
        if len(self._ready) < self.max_ready:
            self._room.set()

    def abandon(self, rows: Sequence[PendingEvent]) -> None:
        """Not committed after all."""
        self._held.difference_update(r.event_id for r in rows)

    # -- running --------------------------------------------------------------------------

    def kick(self) -> None:
        """Something was committed: publish soon."""
        self._wake.set()

    def start(self) -> None:
        """Start relaying in the background on the running event loop."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopping = False
        self._task = loop.create_task(self._run(), name="outbox-relay")

    async def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Stop the background task, then publish what is pending (within `flush_timeout`)."""
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), flush_timeout)
        except Exception as exc:  # noqa: BLE001 - rows stay in the outbox; the next relay publishes them
            log.warning("outbox not flushed at shutdown; events wait for the next worker", error=repr(exc))

    async def flush(self) -> None:
        """Relay until nothing of ours is pending, in memory or in the table."""
        self._scan = True
        while await self.relay_once(claim=False) or self._ready or self._scan:
            pass
        await self.store.flush_marks()

    async def relay_once(self, *, claim: bool = True) -> int:
        """Publish one batch in order (first taking over orphaned rows, with `claim`); returns how many."""
        async with self._lock:
            if claim:
                self._claimed_at = time.monotonic()
                taken = await self.store.claim_orphans(orphaned_after=self.orphaned_after)
                if taken:
                    log.info("took over outbox rows of a worker that is gone", rows=taken)
                    self._scan = True
            if self._scan or not self._listening:
                # Older rows first: what a failure left, or taken over, then what is in memory.
                done = await self._relay_table()
                if done < self.batch:
                    self._scan = False
                if done:
                    return done
            if self._ready:
                return await self._relay_memory()
            return 0

    async def _relay_table(self) -> int:
        pending = [r for r in await self.store.unpublished(limit=self.batch) if r.event_id not in self._held]
        return len(await self._publish(pending))

    async def _relay_memory(self) -> int:
        rows, self._ready = self._ready[: self.batch], self._ready[self.batch :]
        self._ready_taken()
        try:
            return len(await self._publish(rows))
        except BaseException:
            # What did not go out is in the table: read from there, in order, before the rest.
            self._held.difference_update(r.event_id for r in self._ready)
            self._ready.clear()
            self._ready_taken()
            self._scan = True
            raise
        finally:
            self._held.difference_update(r.event_id for r in rows)

    async def _publish(self, pending: Sequence[PendingEvent]) -> list[str]:
        """Publish rows, each broker's in outbox order and the brokers side by side; mark what went out.

        Order is kept per broker: the two brokers' rows interleave in the outbox, and publishing them
        run by run would wait for a round trip at every switch."""
        done: list[str] = []
        by_transport: dict[str, list[PendingEvent]] = {}
        for row in pending:
            by_transport.setdefault(row.transport, []).append(row)
        try:
            results = await asyncio.gather(
                *(self._publish_one(transport, rows) for transport, rows in by_transport.items()),
                return_exceptions=True,
            )
            for rows, result in zip(by_transport.values(), results, strict=True):
                if not isinstance(result, BaseException):
                    done.extend(r.event_id for r in rows)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        finally:
            # Mark what went out even when a later run failed: it must not go out twice. In the
            # next group commit: a transaction of its own would cost each batch a BEGIN and a COMMIT.
            await self.store.mark_published_soon(done)
            self.published += len(done)
        return done

    async def _publish_one(self, transport: str, rows: list[PendingEvent]) -> None:
        for row in rows:
            faults.crash_at("before_publish", row.payload)
        await self.outlets[cast("Transport", transport)].publish_events(rows)
        for event_type, count in collections.Counter(r.event_type for r in rows).items():
            metrics.EVENTS_PUBLISHED.labels(transport, event_type).inc(count)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                # A kick (a commit) publishes our rows; orphans are looked for once per interval.
                claim = time.monotonic() - self._claimed_at >= self.interval
                while await self.relay_once(claim=claim) == self.batch or self._ready:
                    claim = False
            except Exception as exc:  # noqa: BLE001 - a broker or database outage: wait and try again
                log.warning("outbox relay cannot publish yet; events wait in the outbox", error=repr(exc))
                await asyncio.sleep(self.interval)
