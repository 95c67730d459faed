"""Group commit with several writers: other keys' units do not wait behind a slow transaction,
one key's units are written in order and never two at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from streams.core.committer import GroupCommitter


class GatedWrites:
    """A `write` that records each batch and holds the batches of key "slow" until released."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.release = asyncio.Event()
        self.writing: set[str] = set()
        self.overlapped: list[str] = []
        self.began = asyncio.Event()  # a batch is being written

    async def __call__(self, units: Sequence[tuple[str, int]]) -> list[int]:
        keys = {key for key, _ in units}
        self.overlapped.extend(keys & self.writing)
        self.writing |= keys
        self.batches.append(list(units))
        self.began.set()
        try:
            if "slow" in keys:
                await self.release.wait()
            return [n for _, n in units]
        finally:
            self.writing -= keys


def by_key(unit: tuple[str, int]) -> str:
    return unit[0]


@contextlib.asynccontextmanager
async def held(
    writers: int,
) -> AsyncIterator[tuple[GroupCommitter[tuple[str, int], int], GatedWrites, asyncio.Future[int]]]:
    """A started committer whose writer of key "slow" is inside its transaction with unit 0."""
    writes = GatedWrites()
    committer = GroupCommitter(writes, writers=writers, partition=by_key)
    committer.start()
    try:
        first = asyncio.ensure_future(committer.submit(("slow", 0)))
        await asyncio.wait_for(writes.began.wait(), 2)
        yield committer, writes, first
    finally:
        writes.release.set()
        await committer.stop()


async def test_a_unit_of_another_key_is_written_while_a_transaction_is_held_up() -> None:
    """Writer of "slow" blocked in its transaction: a unit of another key still commits meanwhile."""
    async with held(writers=4) as (committer, writes, first):
        # A key on another writer than "slow" (keys hash per process; try until one differs).
        other = next(
            k
            for k in (f"k{i}" for i in range(100))
            if committer._queue_of((k, 0)) is not committer._queue_of(("slow", 0))
        )
        assert await asyncio.wait_for(committer.submit((other, 2)), 2) == 2
        assert not first.done(), "the slow transaction is still open"
        writes.release.set()
        assert await first == 0


async def test_units_of_one_key_are_written_in_order_and_never_at_once() -> None:
    """50 units of one key, submitted together with others while its writer is held: in order, one batch at a time."""
    async with held(writers=3) as (committer, writes, first):
        rest = asyncio.ensure_future(
            committer.submit_many([("slow", n) for n in range(1, 50)] + [(f"k{n}", n) for n in range(20)])
        )
        await asyncio.sleep(0)  # queued (submit_many queues before its first wait) while "slow" is held
        assert not rest.done()
        writes.release.set()
        assert await first == 0
        results = await asyncio.wait_for(rest, 2)
        assert results[:49] == list(range(1, 50))
        written = [n for batch in writes.batches for key, n in batch if key == "slow"]
        assert written == list(range(50))
        assert writes.overlapped == []


def test_several_writers_need_a_partition_key() -> None:
    """Without a key, units of one stream could race each other on two writers: refused."""

    async def write(units: Sequence[int]) -> list[int]:
        return list(units)

    with pytest.raises(ValueError, match="partition"):
        GroupCommitter(write, writers=2)


class RecordedWrites:
    """A `write` that records batch sizes and fails any batch holding a negative unit."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def __call__(self, units: Sequence[int]) -> list[int]:
        self.sizes.append(len(units))
        if any(u < 0 for u in units):
            raise ValueError(f"bad unit in {len(units)}")
        return [u * 10 for u in units]


async def test_a_failing_unit_fails_alone_and_the_others_of_its_batch_commit() -> None:
    writes = RecordedWrites()
    committer: GroupCommitter[int, int] = GroupCommitter(writes)
    committer.start()
    try:
        results = await committer.submit_many([1, -2, 3])
        assert results[0] == 10
        assert isinstance(results[1], ValueError)
        assert results[2] == 30
        assert writes.sizes == [3, 1, 1, 1], "the batch, then each unit alone"
        with pytest.raises(ValueError, match="bad unit"):
            await committer.submit(-1)
        assert await committer.submit(4) == 40
    finally:
        await committer.stop()


async def test_units_queued_together_share_batches_of_at_most_max_batch() -> None:
    writes = RecordedWrites()
    committer: GroupCommitter[int, int] = GroupCommitter(writes, max_batch=256)
    committer.start()
    try:
        big, *small = await asyncio.gather(
            committer.submit_many(list(range(600))), *(committer.submit_many(list(range(100))) for _ in range(3))
        )
        assert big == [u * 10 for u in range(600)]
        assert all(r == [u * 10 for u in range(100)] for r in small)
        assert sum(writes.sizes) == 900
        assert max(writes.sizes) <= 256
        assert len(writes.sizes) <= 5, writes.sizes  # 256, 256, 88 + 100, 100 + 100 (or better)
    finally:
        await committer.stop()


async def test_before_start_each_unit_is_written_alone() -> None:
    writes = RecordedWrites()
    committer: GroupCommitter[int, int] = GroupCommitter(writes)
    results = await committer.submit_many([1, -1, 2])
    assert results[0] == 10
    assert isinstance(results[1], ValueError)
    assert results[2] == 20
    assert writes.sizes == [1, 1, 1]
