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

from streams.core.logging import get_logger
from streams.core.periodic import cancel_and_wait

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
        # Each entry: units queued together, and the future of their results (one each, in order).
        self._queues: list[asyncio.Queue[tuple[list[U], asyncio.Future[list[R | BaseException]]]]] = [
            asyncio.Queue() for _ in range(writers)
        ]
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
        if not self.started:
            return (await self._write([unit]))[0]  # not started on this loop: write alone
        future: asyncio.Future[list[R | BaseException]] = asyncio.get_running_loop().create_future()
        self._queue_of(unit).put_nowait(([unit], future))
        (result,) = await future
        if isinstance(result, BaseException):
            raise result
        return result

    async def submit_many(self, units: Sequence[U]) -> list[R | BaseException]:
        """Queue several units at once and wait for all; per unit, its result or what it failed with.

        The units of one writer go into its queue as one group with one future (at most
        `max_batch` a group), not a future each, so a large commit does not pay for a future, a
        queue entry and a callback per unit.
        """
        if not self.started:
            return [await self._alone(unit) for unit in units]
        loop = asyncio.get_running_loop()
        by_queue: dict[int, list[int]] = {}
        for i, unit in enumerate(units):
            by_queue.setdefault(self._queue_index(unit), []).append(i)
        waits: list[tuple[list[int], asyncio.Future[list[R | BaseException]]]] = []
        for q, at in by_queue.items():
            for chunk in range(0, len(at), self.max_batch):
                positions = at[chunk : chunk + self.max_batch]
                future: asyncio.Future[list[R | BaseException]] = loop.create_future()
                self._queues[q].put_nowait(([units[i] for i in positions], future))
                waits.append((positions, future))
        results: list[R | BaseException] = [None] * len(units)  # type: ignore[list-item]  # every slot is filled below
        for positions, future in waits:
            for i, result in zip(positions, await future, strict=True):
                results[i] = result
        return results

    async def _alone(self, unit: U) -> R | BaseException:
        try:
            return (await self._write([unit]))[0]
        except Exception as exc:  # noqa: BLE001 - the caller gets it in this unit's place
            return exc

    def _queue_of(self, unit: U) -> asyncio.Queue[tuple[list[U], asyncio.Future[list[R | BaseException]]]]:
        return self._queues[self._queue_index(unit)]

    def _queue_index(self, unit: U) -> int:
        if self._partition is None:
            return 0
        return hash(self._partition(unit)) % len(self._queues)

    @property
    def started(self) -> bool:
        """True when the writer task runs on the running loop."""
        task = self._task
        return task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop()

    async def _run(self, queue: asyncio.Queue[tuple[list[U], asyncio.Future[list[R | BaseException]]]]) -> None:
        carried = None  # a group that would have made the last batch bigger than `max_batch`
        while True:
            groups = [carried or await queue.get()]
            carried = None
            size = len(groups[0][0])
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while size < self.max_batch:
                try:
                    group = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        group = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                if size + len(group[0]) > self.max_batch:
                    carried = group  # the first of the next batch
                    break
                groups.append(group)
                size += len(group[0])
            await self._flush(groups)
            for _ in groups:
                queue.task_done()

    async def _flush(self, groups: list[tuple[list[U], asyncio.Future[list[R | BaseException]]]]) -> None:
        units = [unit for group, _ in groups for unit in group]
        results: list[R | BaseException]
        try:
            results = list(await self._write(units))
            self.batches += 1
            self.units += len(units)
        except Exception as exc:  # noqa: BLE001 - isolate the failing unit below
            if len(units) == 1:
                results = [exc]
            else:
                log.info("batch failed, writing its units one by one", size=len(units), error=repr(exc))
                results = []
                for unit in units:
                    try:
                        results.extend(await self._write([unit]))
                        self.batches += 1
                        self.units += 1
                    except Exception as alone:  # noqa: BLE001 - this unit's own failure
                        results.append(alone)
        at = 0
        for group, future in groups:
            _settle(future, result=results[at : at + len(group)])
            at += len(group)


def _settle(future: asyncio.Future[list[R | BaseException]], *, result: list[R | BaseException]) -> None:
    if not future.done():  # its caller may have given up (cancelled)
        future.set_result(result)
