"""Group commit: concurrent messages share one transaction, bounded in size and in waiting time.

Each message submits its unit of work and awaits its own result; one writer task takes whatever
is queued (up to `max_batch`, waiting at most `max_wait` for more) and writes it in a single
transaction. When a batch fails, its units are retried one by one, so one bad unit fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
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
        self, write: Callable[[Sequence[U]], Awaitable[Sequence[R]]], max_batch: int = 256, max_wait: float = 0.0
    ) -> None:
        self._write = write
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: asyncio.Queue[tuple[U, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.units = 0

    def start(self) -> None:
        """Start the writer task on the running event loop (again, if an earlier loop went away)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._queue = asyncio.Queue()
        self._task = loop.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None and not self._task.done():
            try:  # the writer empties the queue; bounded, should it have died with units queued
                await asyncio.wait_for(self._queue.join(), STOP_GRACE)
            except TimeoutError:
                log.warning("group commit queue not drained at stop", queued=self._queue.qsize())
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def submit(self, unit: U) -> R:
        """Queue one unit and wait until its transaction committed (or failed)."""
        if self._task is None or self._task.done() or self._task.get_loop() is not asyncio.get_running_loop():
            return (await self._write([unit]))[0]  # not started on this loop: write alone
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((unit, future))
        return await future

    def submit_many(self, units: Sequence[U]) -> list[asyncio.Future[R]]:
        """Queue several units at once; one future each (no task per unit). Needs `start()`."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for unit in units:
            future: asyncio.Future[R] = loop.create_future()
            self._queue.put_nowait((unit, future))
            futures.append(future)
        return futures

    @property
    def started(self) -> bool:
        """True when the writer task runs on the running loop."""
        task = self._task
        return task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._flush(batch)
            for _ in batch:
                self._queue.task_done()

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
