"""Lanes: the command consumers of a running worker, reading and acknowledging in batches.

FastStream dispatches every message through its own call chain (parser, decoder, middlewares,
FastDepends, an acknowledgement each), which costs more CPU than all of the pipeline's own work
(`make bench-profile`). A lane reads with the broker client FastStream already connected (the
RabbitMQ connection, the Redis pool), and puts each message through the same `Pipeline.process`
as the FastStream subscriber does, beside the others. What costs a round trip is shared by the
messages in flight: their inbox reads and commits (group commit), their crash-ledger updates, and
their acknowledgements (one `basic.ack` with `multiple` for a run of finished deliveries; one
XACK for every finished entry).

The FastStream subscribers stay declared (AsyncAPI, in-memory tests) and are not started for
the command queues and streams a lane reads. The reclaiming Redis subscribers still run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import aiormq
import redis.asyncio as aioredis
from aio_pika import RobustChannel
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from redis.exceptions import RedisError, ResponseError

from handlers.errors import InvalidMessageError
from schemas import Command, Event, MessageContext
from streams import amqp, metrics, topology
from streams.breaker import State
from streams.envelope import Envelope
from streams.groups import ensure_group
from streams.logging import bind_message, get_logger, unbind_message
from streams.outlets import DATA_KEY, RabbitOutlet, RedisOutlet
from streams.pipeline import Delivery, Flow, Pipeline

log = get_logger("pipeline.lanes")

Handler = Callable[[Any, MessageContext], Awaitable[Event]]
C = TypeVar("C", bound=Command)
RETRY_SECONDS = 1.0
# A second batch starts beside a running one that has run this long (a slow handler).
HOLD_SECONDS = 0.05
# ... or once this many messages wait for it: under load the window refills faster than a batch
# ends. Not half the prefetch window: with a big window that held arrivals back for a whole batch
# at moderate rates (p99 at half the drain rate 27-50 -> 90-100 ms at prefetch 128, `make bench`).
SECOND_BATCH_AT = 32
# Batches of one lane handled at once (PIPELINE_LANE_BATCHES). Messages that arrive while they
# run wait for the next batch: one message alone when the queue is quiet, up to the prefetch
# window under load.


class Lane(Protocol):
    """What the app and health need of a lane."""

    name: str  # e.g. `rabbit:email`, as the FastStream subscriber it stands in for

    @property
    def running(self) -> bool:
        """True while it consumes."""
        ...

    async def start(self) -> None:
        """Start consuming."""
        ...

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a budget for in-flight work
        """Stop fetching, finish what is in flight (at most `timeout` s), acknowledge it."""
        ...


def decode(flow: Flow[C], env: Envelope) -> C:
    """The command in a message, decoded as FastStream would, validated by the flow's model."""
    if env.fields is not None and DATA_KEY not in env.fields:
        # A plain stream entry (not FastStream's envelope): its fields are the command's fields.
        try:
            fields = {k.decode(): v.decode() for k, v in env.fields.items()}
        except UnicodeDecodeError as exc:
            raise InvalidMessageError("stream entry fields are not UTF-8 text") from exc
        return cast(C, flow.command.model_validate(fields))
    content_type = env.headers.get("content-type")
    if content_type and content_type != "application/octet-stream" and not content_type.startswith("application/json"):
        raise InvalidMessageError(f"content type {content_type!r} is not JSON")
    return cast(C, flow.command.model_validate_json(env.body))


class _Route:
    """One flow's handler behind the pipeline: decode, then `Pipeline.run`."""

    def __init__(self, pipeline: Pipeline, flow: Flow[Any], handler: Handler) -> None:
        self.pipeline = pipeline
        self.flow = flow
        self.handler = handler

    async def process(self, env: Envelope) -> None:
        """The whole life of one delivery; raises only when its failure could not be handled."""
        delivery = Delivery(env)
        bind_message(env.message_id, env.correlation_id, env.source)
        monitor = self.pipeline.monitor
        monitor.started(env.transport, env.source)
        try:
            await self.pipeline.process(delivery, lambda: self._run(delivery))
        finally:
            monitor.finished(env.transport, env.source)
            unbind_message()

    async def _run(self, delivery: Delivery) -> None:
        cmd = decode(self.flow, delivery.envelope)
        ctx = delivery.envelope.context
        await self.pipeline.run(delivery, self.flow, cmd, lambda: self.handler(cmd, ctx))

    async def process_batch(
        self, envs: Sequence[Envelope], done: Callable[[list[int]], None] | None = None
    ) -> list[bool]:
        """Deliveries that arrived together: first deliveries that decode go through `run_batch`,
        side by side; the rest (redelivered, oversized, undecodable, or while the breaker is not
        closed) one by one through `process`. Per delivery: acknowledge it, or leave it to the broker.
        `done` gets, as soon as their outcomes are committed, the positions of those that are done."""
        pipeline = self.pipeline
        fast: list[tuple[Delivery, Any]] = []
        fast_at: list[int] = []
        slow_at: list[int] = []
        closed = pipeline.breaker(self.flow.dependency).state is State.CLOSED
        limit = pipeline.settings.max_body_bytes
        for i, env in enumerate(envs):
            if not closed or env.redeliveries or env.size > limit:
                slow_at.append(i)
                continue
            try:
                cmd = decode(self.flow, env)
            except Exception:  # noqa: BLE001 - `process` decodes it again and dead-letters it
                slow_at.append(i)
                continue
            fast.append((Delivery(env), cmd))
            fast_at.append(i)
        acks = [True] * len(envs)

        async def one(i: int) -> None:
            try:
                await self.process(envs[i])
            except Exception as exc:  # noqa: BLE001 - left to the broker
                acks[i] = False
                log.error("failure not handled; the message is left to the broker", error=repr(exc))

        await asyncio.gather(self._fast(fast, fast_at, acks, done), *(one(i) for i in slow_at))
        return acks

    async def _fast(
        self,
        fast: list[tuple[Delivery, Any]],
        at: list[int],
        acks: list[bool],
        done: Callable[[list[int]], None] | None = None,
    ) -> None:
        if not fast:
            return
        pipeline = self.pipeline
        env0 = fast[0][0].envelope
        pipeline.monitor.started(env0.transport, env0.source, len(fast))
        try:
            async with pipeline.isolation.shared():
                try:

                    def committed(results: Sequence[BaseException | None]) -> None:
                        if done is not None:
                            done([at[k] for k, exc in enumerate(results) if exc is None])

                    results = await pipeline.run_batch(self.flow, fast, self.handler, committed)
                except Exception as exc:  # noqa: BLE001 - the store or the ledger failed the whole batch
                    results = [exc] * len(fast)
                failed = [(k, exc) for k, exc in enumerate(results) if exc is not None]
                if failed:
                    settled = await asyncio.gather(*(self._fail(fast[k][0], exc) for k, exc in failed))
                    for (k, _), ok in zip(failed, settled, strict=True):
                        acks[at[k]] = ok
        finally:
            pipeline.monitor.finished(env0.transport, env0.source, len(fast))

    async def _fail(self, delivery: Delivery, exc: BaseException) -> bool:
        """Classify one failure of the batch as `process` would; False when that failed too."""
        env = delivery.envelope
        bind_message(env.message_id, env.correlation_id, env.source)
        try:
            await self.pipeline.fail(delivery, exc)
        except Exception as again:  # noqa: BLE001 - left to the broker
            log.error("failure not handled; the message is left to the broker", error=repr(again))
            return False
        return True


class _InFlight:
    """The work tasks of a lane, waited for at stop."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        deadline = asyncio.get_running_loop().time() + timeout
        while self.tasks:  # a batch that ends may have started another
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                for task in self.tasks:
                    task.cancel()
                return
            await asyncio.wait(set(self.tasks), timeout=left)


class _Settled:
    """A delivery as the lane acknowledges it: on the aiormq channel it arrived on, by its tag."""

    __slots__ = ("channel", "delivery_tag", "message")

    def __init__(self, message: DeliveredMessage) -> None:
        self.message = message
        self.channel = message.channel
        assert message.delivery_tag is not None  # only a Basic.GetEmpty has none
        self.delivery_tag: int = message.delivery_tag

    # Not waiting for the socket to drain (wait=False): the frame is queued in order on the
    # connection, and nothing here depends on when it left; waiting cost a future and a wakeup
    # an acknowledgement.
    async def ack(self, multiple: bool = False) -> None:
        await self.channel.basic_ack(self.delivery_tag, multiple=multiple, wait=False)

    async def reject(self, requeue: bool = False) -> None:
        await self.channel.basic_reject(self.delivery_tag, requeue=requeue, wait=False)


class RabbitLane:
    """One command queue on its own channel: deliveries handled side by side, acknowledged in runs."""

    def __init__(
        self, pipeline: Pipeline, flow: Flow[Any], handler: Handler, queue: str, *, prefetch: int, batches: int = 2
    ) -> None:
        self.name = f"rabbit:{queue}"
        self.queue_name = queue
        self.route = _Route(pipeline, flow, handler)
        self.prefetch = prefetch
        self.batches = batches
        self._started = False
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._in_flight = _InFlight()
        # Deliveries in arrival order with their state: None while handled, True to ack, False rejected.
        self._order: deque[_Settled] = deque()
        self._done: dict[int, bool] = {}  # id(message) -> ack?
        self._pending: list[_Settled] = []  # arrived, waiting for a batch
        self._batches = 0  # batches being handled
        self._running_since = 0.0  # when the running batch began (about: see _work)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._acking: set[asyncio.Task[None]] = set()
        self._consumer: aiormq.Channel | None = None  # the aiormq channel the consumer is on

    def bind(self, connection: AbstractConnection) -> None:
        """Consume over this (FastStream's, robust) connection."""
        self._connection = connection

    async def start(self) -> None:
        assert self._connection is not None, "bind() the lane to a connection first"
        # A channel of its own: `multiple` acknowledgements cover this lane's deliveries only.
        channel = self._channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        # Declared as the topology does (a no-op on the existing queue), so that the robust channel
        # declares it again after a broker restart; the consumer is then restored by `_consume`.
        spec = topology.command_queue(self.queue_name)
        self._queue = await channel.declare_queue(spec.name, durable=spec.durable, arguments=dict(spec.arguments or {}))
        self._started = True
        try:
            await self._consume()
        except BaseException:
            self._started = False
            raise
        if isinstance(channel, RobustChannel):
            channel.reopen_callbacks.add(self._reopened)

    async def _consume(self) -> None:
        """Consume on the channel's current aiormq channel, straight to `_on_delivery`.

        Not through aio-pika's `Queue.consume`: it wraps every delivery in an `IncomingMessage`
        and a task of its own, besides the task aiormq starts (about 23 µs of CPU a message in a
        side-by-side consumer bench); nor through aiormq's task per delivery (`consume_inline`).
        The robust channel does not know this consumer, so it is started again whenever that
        channel reopens (`_reopened`).
        """
        assert self._channel is not None
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        # Called in the channel's reader, without aiormq's task per delivery (`amqp.consume_inline`).
        self._tag = await amqp.consume_inline(underlay, self.queue_name, self._on_delivery)
        self._consumer = underlay

    async def _reopened(self, _: object) -> None:
        """The robust channel came back (a reconnect): consume again on its new aiormq channel."""
        while self._started and self._channel is not None and not self._channel.is_closed:
            try:
                await self._consume()
                return
            except Exception as exc:  # noqa: BLE001 - tried again while the channel stays open; else at its next reopen
                log.warning("cannot consume again after the channel reopened", queue=self.queue_name, error=repr(exc))
                await asyncio.sleep(RETRY_SECONDS)

    @property
    def running(self) -> bool:
        """Consuming: started, not stopped, and its channel open (it reopens after a reconnect)."""
        return (
            self._started
            and self._channel is not None
            and not self._channel.is_closed
            and self._consumer is not None
            and not self._consumer.is_closed
        )

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109
        self._started = False
        if self._consumer is not None and self._tag is not None:
            with contextlib.suppress(Exception):  # a closed channel has no consumer left to cancel
                await self._consumer.basic_cancel(self._tag)
            self._tag = None
        await self._in_flight.drain(timeout)
        self._flush()
        if self._acking:
            await asyncio.wait(set(self._acking), timeout=5.0)
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()  # what was not acknowledged goes back to the queue
            self._channel = None

    def _on_delivery(self, message: DeliveredMessage) -> None:
        self._on_message(_Settled(message))

    def _on_message(self, message: _Settled) -> None:
        self._order.append(message)
        self._pending.append(message)
        self._maybe_next_batch()

    def _maybe_next_batch(self) -> None:
        """Start a batch when none runs; beside a running one only when enough waits, or it is slow.

        Under load each batch takes what arrived during the one before (the window fills, the
        CPU per message falls); two small batches side by side would each pay a transaction. A
        slow handler (an LLM call) does not hold the others up for longer than `HOLD_SECONDS`.
        """
        if not self._pending or not self._started or self._batches >= self.batches:
            return
        loop = asyncio.get_running_loop()
        held = loop.time() - self._running_since if self._batches else 0.0
        if not self._batches or len(self._pending) >= min(self.prefetch // 2, SECOND_BATCH_AT) or held >= HOLD_SECONDS:
            self._next_batch()
        elif self._hold_timer is None:
            self._hold_timer = loop.call_later(HOLD_SECONDS - held, self._hold_over)

    def _hold_over(self) -> None:
        self._hold_timer = None
        self._maybe_next_batch()

    def _next_batch(self) -> None:
        """Handle what arrived since the last batch began, as one batch."""
        batch, self._pending = self._pending, []
        if not self._batches:
            self._running_since = asyncio.get_running_loop().time()
        self._batches += 1
        self._in_flight.spawn(self._work(batch))

    async def _work(self, batch: list[_Settled]) -> None:
        early: set[int] = set()

        def done(positions: list[int]) -> None:
            # Committed (the outbox holds their outcomes): acknowledged now, not after the
            # outcomes' confirms, so the window refills while they are awaited.
            for i in positions:
                early.add(i)
                self._done[id(batch[i])] = True
            self._schedule_flush()

        try:
            acks = await self.route.process_batch(
                [RabbitOutlet.framed(m.message, self.queue_name) for m in batch], done
            )
        except Exception as exc:  # noqa: BLE001 - their failure could not be handled: the broker keeps them
            acks = [False] * len(batch)
            log.error("failure not handled; the messages are rejected to the broker", error=repr(exc))
        finally:
            self._batches -= 1
            self._running_since = asyncio.get_running_loop().time()  # the other one's age is unknown: from now
        for i, (message, ack) in enumerate(zip(batch, acks, strict=True)):
            if i not in early:
                self._done[id(message)] = ack
        self._schedule_flush()
        self._maybe_next_batch()  # stopping: what has not started stays unacknowledged, for the broker

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Acknowledge every finished delivery: each unbroken run from the oldest with one `multiple`."""
        self._flush_scheduled = False
        order, done = self._order, self._done
        run_end: _Settled | None = None
        sends: list[tuple[_Settled, bool, bool]] = []  # (delivery, ack? else reject, multiple)
        while order and id(order[0]) in done:
            message = order.popleft()
            if done.pop(id(message)):
                if run_end is not None and run_end.channel is not message.channel:
                    sends.append((run_end, True, True))  # a reconnect began a new channel
                run_end = message
            else:
                if run_end is not None:
                    sends.append((run_end, True, True))
                    run_end = None
                sends.append((message, False, False))
        if run_end is not None:
            sends.append((run_end, True, True))
        if len(done) > self.prefetch // 2:
            # A slow delivery holds the run back: acknowledge the finished ones behind it one by one.
            for message in list(order):
                ok = done.pop(id(message), None)
                if ok is not None:
                    order.remove(message)
                    sends.append((message, ok, False))
        if sends:
            self._send(sends)

    def _send(self, sends: list[tuple[_Settled, bool, bool]]) -> None:
        """Queue the acknowledgements on the connection now, in order (`amqp.send_now`: in the same
        socket write as the outcomes published in this turn of the loop, `amqp.FrameWriter`);
        what cannot be queued now, and everything after it, goes the awaited way."""
        sent = 0
        if not self._acking:  # none still on its way the awaited way, which they must not overtake
            for message, ok, multiple in sends:
                method = (
                    spec.Basic.Ack(delivery_tag=message.delivery_tag, multiple=multiple)
                    if ok
                    else spec.Basic.Reject(delivery_tag=message.delivery_tag, requeue=False)
                )
                if not amqp.send_now(cast(aiormq.Channel, message.channel), method):
                    break
                sent += 1
        if sent < len(sends):
            calls = [m.ack(multiple=multiple) if ok else m.reject() for m, ok, multiple in sends[sent:]]
            task = asyncio.ensure_future(_settle(calls))
            self._acking.add(task)
            task.add_done_callback(self._acking.discard)


async def _settle(calls: Sequence[Awaitable[None]]) -> None:
    # In order: a reject must reach the broker before a `multiple` ack of a later delivery.
    for call in calls:
        try:
            await call
        except Exception as exc:  # noqa: BLE001
            # The channel closed under it: the broker delivers those messages again; the inbox
            # makes the second delivery a no-op.
            log.warning("acknowledgement lost with its channel; the broker redelivers", error=repr(exc))


class RedisLane:
    """One command stream read by this worker's consumer: entries handled side by side, one XACK a flush."""

    def __init__(
        self,
        pipeline: Pipeline,
        flow: Flow[Any],
        handler: Handler,
        client: aioredis.Redis,
        stream: str,
        group: str,
        *,
        count: int,
        max_in_flight: int,
        block_ms: int = 100,
        batches: int = 2,
    ) -> None:
        self.name = f"redis:{stream}"
        self.stream = stream
        self.group = group
        self.consumer = "worker"  # set per process before start
        self.client = client
        self.route = _Route(pipeline, flow, handler)
        self.count = count
        self.block_ms = block_ms
        self.running = False
        self._max_in_flight = max_in_flight
        self.batches = batches
        self._batches = 0  # batches being handled
        self._running_since = 0.0  # when the oldest running batch began (about, as RabbitLane)
        self._in_use = 0  # entries read and not yet finished
        self._room = asyncio.Event()
        self._in_flight = _InFlight()
        self._to_ack: list[bytes] = []
        self._flush_scheduled = False
        self._acking: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._room = asyncio.Event()
        self.running = True
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"lane-{self.name}")

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109
        self.running = False
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        await self._in_flight.drain(timeout)
        self._flush()
        if self._acking:
            await asyncio.wait(set(self._acking), timeout=5.0)

    async def _read(self) -> None:
        while self.running:
            free = await self._wait_for_room()
            try:
                answer = await self.client.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=min(self.count, free), block=self.block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._recreate_group()
                    continue
                log.warning("cannot read the stream", stream=self.stream, error=repr(exc))
                await asyncio.sleep(RETRY_SECONDS)
                continue
            except (RedisError, OSError) as exc:
                log.warning("cannot read the stream yet", stream=self.stream, error=repr(exc))
                await asyncio.sleep(RETRY_SECONDS)
                continue
            streams: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = answer or []  # type: ignore[assignment]
            for _, entries in streams:
                if entries:
                    if not self._batches:
                        self._running_since = asyncio.get_running_loop().time()
                    self._batches += 1
                    self._in_use += len(entries)
                    self._in_flight.spawn(self._work(entries))

    async def _wait_for_room(self) -> int:
        """Wait until another batch may start; how many entries may be read for it.

        As `RabbitLane`: while a batch runs, what arrives waits for it to end and forms the next
        batch (each batch pays its transaction, crash-ledger and publish round trips once, so
        many small batches side by side made a moderate rate cost twice the CPU per message of
        a full queue); a second batch starts beside it only once it is `HOLD_SECONDS` old (a slow
        handler), and never more than `batches`, nor more than `max_in_flight` entries.
        """
        loop = asyncio.get_running_loop()
        while True:
            held = loop.time() - self._running_since
            if self._in_use < self._max_in_flight and (
                not self._batches or (self._batches < self.batches and held >= HOLD_SECONDS)
            ):
                return self._max_in_flight - self._in_use
            self._room.clear()
            if self._batches and self._batches < self.batches and self._in_use < self._max_in_flight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), HOLD_SECONDS - held)
            else:
                await self._room.wait()

    async def _recreate_group(self) -> None:
        while self.running:
            try:
                await ensure_group(self.client, self.stream, self.group)
            except (RedisError, OSError) as exc:
                log.warning("cannot re-create consumer group yet", stream=self.stream, error=repr(exc))
                await asyncio.sleep(RETRY_SECONDS)
                continue
            metrics.GROUPS_RECREATED.labels(self.stream, self.group).inc()
            log.warning("consumer group was lost (Redis restarted?); re-created it", stream=self.stream)
            return

    async def _work(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        try:
            envs = [RedisOutlet.entry(self.stream, entry_id.decode(), fields) for entry_id, fields in entries]
            acks = await self.route.process_batch(envs)
        except Exception as exc:  # noqa: BLE001 - left pending: the reclaiming subscriber takes them later
            acks = [False] * len(entries)
            log.error("failure not handled; the entries stay pending", error=repr(exc))
        finally:
            self._in_use -= len(entries)
            self._batches -= 1
            self._running_since = asyncio.get_running_loop().time()  # the other one's age is unknown: from now
            self._room.set()
        # A failure that could not be handled stays pending: the reclaiming subscriber takes it later.
        self._to_ack.extend(entry_id for (entry_id, _), ack in zip(entries, acks, strict=True) if ack)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._to_ack:
            return
        ids, self._to_ack = self._to_ack, []
        task = asyncio.ensure_future(self._xack(ids))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _xack(self, ids: list[bytes]) -> None:
        try:
            await self.client.xack(self.stream, self.group, *ids)
        except (RedisError, OSError) as exc:
            # Left pending: reclaimed later, and then a duplicate the inbox skips.
            log.warning("XACK failed; the entries stay pending", stream=self.stream, entries=len(ids), error=repr(exc))
