"""The broker middleware that puts every received message through the Pipeline (both brokers)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from faststream import BaseMiddleware
from faststream._internal.basic_types import AsyncFuncAny
from faststream.message import StreamMessage

from streams.logging import bind_message, get_logger, unbind_message
from streams.outlets import Outlet
from streams.pipeline import Delivery, Pipeline

log = get_logger("pipeline.middleware")

# The message being handled, for the subscriber function. A ContextVar rather than FastStream's
# `Context()`: FastDepends resolves a Context field in a worker thread, once per message.
_CURRENT: contextvars.ContextVar[Delivery] = contextvars.ContextVar("pipeline_delivery")


def current_delivery() -> Delivery:
    """The delivery the calling subscriber function is handling."""
    return _CURRENT.get()


def source_of(handler: Any, fallback: str) -> str:
    """The queue or stream name of the subscriber handling the message."""
    queue = getattr(handler, "queue", None)
    if queue is not None:
        return str(queue.name)
    stream_sub = getattr(handler, "stream_sub", None)
    if stream_sub is not None:
        return str(stream_sub.name)
    return fallback


def reclaims(handler: Any) -> bool:
    """True for a Redis subscriber that reads other consumers' idle pending entries (XAUTOCLAIM)."""
    stream_sub = getattr(handler, "stream_sub", None)
    return stream_sub is not None and stream_sub.min_idle_time is not None


def make_middleware(pipeline: Pipeline, outlet: Outlet, sources: frozenset[str]) -> type[BaseMiddleware]:
    """A middleware class bound to one pipeline, one broker's outlet and its command queues or streams."""

    class PipelineMiddleware(BaseMiddleware):
        """Oversize check, ids into logs, and every failure classified once by the Pipeline."""

        async def consume_scope(self, call_next: AsyncFuncAny, msg: StreamMessage[Any]) -> Any:
            source = source_of(self.context.get_local("handler_"), fallback="")
            if source not in sources:  # not a command subscriber: nothing to wrap
                return await call_next(msg)
            env = outlet.envelope(msg, source)
            if reclaims(self.context.get_local("handler_")):
                # Claimed from another consumer's pending list: that consumer died holding it.
                count: int = await getattr(msg, "get_delivery_count")()  # noqa: B009 - Redis stream messages only
                env = env.with_redeliveries(max(count - 1, 0))
            delivery = Delivery(env)
            bind_message(env.message_id, env.correlation_id, env.source)
            # Shielded: when the broker connection drops mid-message, aio-pika cancels the
            # handler; the work already started (a mail may be out) still gets its outcome
            # committed, and the redelivered copy then finds it in the inbox.
            work = asyncio.ensure_future(self._handle(call_next, msg, delivery))
            pipeline.monitor.started(env.transport, env.source)
            work.add_done_callback(lambda _: pipeline.monitor.finished(env.transport, env.source))
            try:
                return await asyncio.shield(work)
            finally:
                unbind_message()

        async def _handle(self, call_next: AsyncFuncAny, msg: StreamMessage[Any], delivery: Delivery) -> None:
            async def handle() -> None:
                _CURRENT.set(delivery)  # this task's own context: set, never reset, gone with the task
                await call_next(msg)

            await pipeline.process(delivery, handle)

    return PipelineMiddleware
