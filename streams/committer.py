"""Group commit: concurrent messages share one transaction, bounded in size and in waiting time.

Each message submits its unit of work and awaits its own result; one writer task takes whatever
is queued (up to `max_batch`, waiting at most `max_wait` for more) and writes it in a single
transaction. When a batch fails, its units are retried one by one, so one bad unit fails alone.

With `writers` > 1 (a database with concurrent writers: PostgreSQL) that many transactions are
open at once, so one batch's round trips do not hold up the units queued behind it. Each writer
has its queue, and `partition` sends units of one key (an event stream) always to the same one:
they are written in the order submitted and never race each other for a version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from streams.logging import get_logger
from streams.periodic import cancel_and_wait

log = get_logger("pipeline.committer")

STOP_GRACE = 10.0  # seconds stop() waits for queued units to be written

U = TypeVar("U")
R = TypeVar("R")


class GroupCommitter(Generic[U, R]):
    """Batches units of work into shared transactions written by `write`."""

    def __init__(
        self,
        write: Callable[[Sequence[U]], Awaitable[Sequence[R]]],
        max_batch: int = 256,
        max_wait: float = 0.0,
        *,
        writers: int = 1,
        partition: Callable[[U], Hashable] | None = None,
    ) -> None:
        if writers < 1 or (writers > 1 and partition is None):
            raise ValueError("one writer, or several with a partition key")
        self._write = write
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._partition = partition
        self._queues: list[asyncio.Queue[tuple[U, asyncio.Future[R]]]] = [asyncio.Queue() for _ in range(writers)]
        self._tasks: list[asyncio.Task[None]] = []
        self._task: asyncio.Task[None] | None = None  # the first writer: whether they run, and on which loop
        self.batches = 0
        self.units = 0

    def start(self) -> None:
        """Start the writer task on the running event loop (again, if an earlier loop went away)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._queues = [asyncio.Queue() for _ in self._queues]
        self._tasks = [loop.create_task(self._run(q), name=f"group-commit-{i}") for i, q in enumerate(self._queues)]
        self._task = self._tasks[0]

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None and not self._task.done():
            try:  # the writers empty their queues; bounded, should one have died with units queued
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues)), STOP_GRACE)
            except TimeoutError:
                log.warning("group commit queue not drained at stop", queued=sum(q.qsize() for q in self._queues))
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        self._task = None

    async def submit(self, unit: U) -> R:
        """Queue one unit and wait until its transaction committed (or failed)."""
        if self._task is None or self._task.done() or self._task.get_loop() is not asyncio.get_running_loop():
            return (await self._write([unit]))[0]  # not started on this loop: write alone
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue_of(unit).put_nowait((unit, future))
        return await future

    def submit_many(self, units: Sequence[U]) -> list[asyncio.Future[R]]:
        """Queue several units at once; one future each (no task per unit). Needs `start()`."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for unit in units:
            future: asyncio.Future[R] = loop.create_future()
            self._queue_of(unit).put_nowait((unit, future))
            futures.append(future)
        return futures

    def _queue_of(self, unit: U) -> asyncio.Queue[tuple[U, asyncio.Future[R]]]:
        if self._partition is None:
            return self._queues[0]
        return self._queues[hash(self._partition(unit)) % len(self._queues)]

    @property
    def started(self) -> bool:
        """True when the writer task runs on the running loop."""
        task = self._task
        return task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop()

    async def _run(self, queue: asyncio.Queue[tuple[U, asyncio.Future[R]]]) -> None:
        while True:
            batch = [await queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            await self._flush(batch)
            for _ in batch:
                queue.task_done()

    async def _flush(self, batch: list[tuple[U, asyncio.Future[R]]]) -> None:
        try:
            results = await self._write([unit for unit, _ in batch])
        except Exception as exc:  # noqa: BLE001 - isolate the failing unit below
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            log.info("batch failed, writing its units one by one", size=len(batch), error=repr(exc))
            for item in batch:
                await self._flush([item])
            return
        self.batches += 1
        self.units += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)


def _settle(future: asyncio.Future[R], *, result: R | None = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
