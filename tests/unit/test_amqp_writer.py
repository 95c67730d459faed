"""The connection writer's frame source: what is queued within one turn of the loop goes out as one write."""

from __future__ import annotations

import asyncio

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec

from streams.amqp import FrameWriter


def frame(tag: int, drain: asyncio.Future[None] | None = None) -> ChannelFrame:
    return ChannelFrame.marshall(1, [spec.Basic.Ack(delivery_tag=tag)], drain_future=drain)


async def test_frames_queued_together_come_out_as_one_in_order_each_drained_with_it() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    drains = [loop.create_future(), None, loop.create_future()]
    frames = [frame(tag, drain) for tag, drain in zip((1, 2, 3), drains, strict=True)]
    for f in frames:
        queue.put_nowait(f)
    out = await FrameWriter(queue).__anext__()
    assert out.payload == b"".join(f.payload for f in frames)
    assert queue.empty()
    assert out.should_drain
    assert not out.should_close
    out.drain()  # what aiormq's writer calls once the write drained
    assert all(d.done() for d in drains if d is not None)
    assert not out.should_drain


async def test_a_lone_frame_is_handed_over_as_it_is() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    one = frame(1)
    queue.put_nowait(one)
    assert await FrameWriter(queue).__anext__() is one


async def test_a_frame_that_closes_the_connection_ends_the_run() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    close = ChannelFrame.marshall(0, [spec.Connection.CloseOk()])
    assert close.should_close
    for f in (frame(1), close, frame(2)):
        queue.put_nowait(f)
    writer = FrameWriter(queue)
    out = await writer.__anext__()
    assert out.should_close
    assert out.payload == frame(1).payload + close.payload
    assert queue.qsize() == 1, "nothing after the close is part of it"


async def test_it_waits_for_the_first_frame_like_aiormqs() -> None:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    writer = FrameWriter(queue)
    pending = asyncio.ensure_future(writer.__anext__())
    await asyncio.sleep(0)
    assert not pending.done()
    queue.put_nowait(frame(7))
    assert (await asyncio.wait_for(pending, 1)).payload == frame(7).payload
    writer.close_event.set()
    with pytest.raises(StopAsyncIteration):
        await writer.__anext__()
