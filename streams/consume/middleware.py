"""The broker middleware that puts every command message through the Pipeline (both brokers).

Each command subscriber is declared with a parser from `routed_parser`: FastStream calls it first,
in the task that then handles the message, and it says which flow and source the message belongs
to. Messages of other subscribers pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from faststream import BaseMiddleware
from faststream.message import StreamMessage
from faststream.redis.parser import BinaryMessageFormatV1

from streams.consume.batches import Batch, decode, set_batch
from streams.consume.pipeline import Admission, Delivery, Pipeline
from streams.core.logging import bind_message, get_logger, unbind_message
from streams.flows.flow import Flow
from streams.transport.outlets import Outlet, ascii_header, envelope_headers

log = get_logger("pipeline.middleware")

DATA_KEY = b"__data__"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message came from: its flow, its queue or stream, and whether it was reclaimed."""

    flow: Flow[Any]
    source: str
    reclaims: bool = False  # read from another consumer's pending list (XAUTOCLAIM)
    batch: bool = False  # a Redis batch read: several entries in one call


@dataclass(frozen=True, slots=True)
class Routed:
    """A message as its subscriber's parser received it, and its route."""

    route: Route
    raw: Any  # what the broker client delivered: an aio-pika message, a Redis entry


# The route of the message the current task handles (set by its subscriber's parser), and the
# delivery the subscriber function handles (set by the middleware). ContextVars rather than
# FastStream's `Context()`: FastDepends resolves a Context field in a worker thread, once a message.
_ROUTED: contextvars.ContextVar[Routed | None] = contextvars.ContextVar("pipeline_routed", default=None)
_CURRENT: contextvars.ContextVar[Delivery] = contextvars.ContextVar("pipeline_delivery")


def current_delivery() -> Delivery:
    """The delivery the calling subscriber function is handling."""
    return _CURRENT.get()


Parse = Callable[[Any], Awaitable[StreamMessage[Any]]]


def routed_parser(route: Route) -> Callable[[Any, Parse], Awaitable[StreamMessage[Any]]]:
    """A subscriber's parser: FastStream's own, after noting the route; it never fails.

    An entry FastStream cannot read (a damaged Redis envelope) gets an empty body, which then fails
    validation: the Pipeline dead-letters it as invalid with its real bytes.
    """

    async def parse(raw: Any, original: Parse) -> StreamMessage[Any]:
        _ROUTED.set(Routed(route, raw))  # the real entry, also when it is replaced below
        try:
            return await original(raw)
        except Exception:
            if not isinstance(raw, dict):  # a RabbitMQ delivery: aio-pika read it already
                raise
            if route.batch:  # FastStream reads the whole batch as one: give it entries it can read
                return await original({**raw, "data": [await _readable(fields) for fields in raw["data"]]})
            return await original({**raw, "data": {DATA_KEY: b""}})

    return parse


async def _readable(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """An entry with an empty body and its headers (its correlation id too), for FastStream's batch parser."""
    data = fields.get(DATA_KEY)
    headers = BinaryMessageFormatV1.parse(data)[1] if data is not None else {}
    entry = await BinaryMessageFormatV1.encode(
        message=b"",
        reply_to=None,
        headers=envelope_headers({str(k): str(v) for k, v in headers.items()}),
        correlation_id=ascii_header(str(headers.get("correlation_id", ""))),
    )
    return {DATA_KEY: entry}


def make_middleware(pipeline: Pipeline, outlet: Outlet) -> type[BaseMiddleware]:
    """A middleware class bound to one pipeline and one broker's outlet."""

    class PipelineMiddleware(BaseMiddleware):
        """Oversize check, ids into logs, and every failure classified once by the Pipeline."""

        async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
            routed = _ROUTED.get()
            if routed is None:  # not a command subscriber: nothing to wrap
                return await call_next(msg)
            _ROUTED.set(None)
            route = routed.route
            if route.batch:
                return await self._batch(call_next, msg, routed)
            env = outlet.envelope(routed.raw, route.source)
            if route.reclaims:
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
                outlet.release([env])  # FastStream acknowledges it next, or leaves it to the broker

        async def _batch(
            self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], routed: Routed
        ) -> Any:
            """Entries read together: each admitted and validated on its own, the valid ones handed on."""
            route = routed.route
            batch = Batch(route.source)
            envs = outlet.entries(routed.raw, route.source)
            try:
                for env in envs:
                    delivery = Delivery(env)
                    if await pipeline.admit(delivery) is Admission.REFUSED:  # oversized: parked
                        continue
                    try:
                        cmd = decode(route.flow, env)
                    except Exception as exc:  # noqa: BLE001 - classified: dead-lettered as invalid
                        bind_message(env.message_id, env.correlation_id, env.source)
                        try:
                            await pipeline.fail(delivery, exc)
                        finally:
                            unbind_message()
                        continue
                    batch.deliveries.append(delivery)
                    batch.commands.append(cmd)
            except BaseException:
                outlet.release(envs)  # left pending: a reclaimer takes them
                raise
            if not batch.deliveries:
                return None
            set_batch(batch)
            return await call_next(msg)

        async def _handle(
            self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], delivery: Delivery
        ) -> None:
            async def handle() -> None:
                _CURRENT.set(delivery)  # this task's own context: set, never reset, gone with the task
                await call_next(msg)

            await pipeline.process(delivery, handle)

    return PipelineMiddleware
