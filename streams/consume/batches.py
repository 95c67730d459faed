"""Redis stream entries read together: FastStream's batch subscriber hands them over in one call.

The middleware admits and validates each entry on its own (an invalid one is dead-lettered with
its bytes while the others go on), and the subscriber function runs the valid ones side by side,
their commits sharing transactions. What has finished after `hold` seconds is acknowledged with one
XACK and the call returns, so the next read is not held up by a slow call (an LLM call of 30 s):
the entries still running go on in the background, each acknowledged once its outcome is
committed, at most `max_in_flight` of them a stream.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from handlers.errors import InvalidMessageError
from schemas.base import Message
from streams.consume.pipeline import Delivery, Pipeline
from streams.core import names
from streams.core.envelope import Envelope
from streams.core.logging import bind_message, get_logger, unbind_message
from streams.flows.flow import Flow
from streams.transport.outlets import RedisOutlet

log = get_logger("pipeline.batches")

C = TypeVar("C", bound=Message)
DATA_KEY = b"__data__"
# Fields of a plain stream entry that are about the message, not the command.
MESSAGE_FIELDS = frozenset(
    {*names.DEAD_LETTER_HEADERS, "message_id", "correlation_id", "content-type", names.H_REPLAYED_FROM}
)


def decode(flow: Flow[C], env: Envelope) -> C:
    """The command in a message, decoded as FastStream would, validated by the flow's model."""
    if env.fields is not None and DATA_KEY not in env.fields:
        # A plain stream entry (not FastStream's envelope): its fields are the command's fields.
        try:
            fields = {k.decode(): v.decode() for k, v in env.fields.items()}
        except UnicodeDecodeError as exc:
            raise InvalidMessageError("stream entry fields are not UTF-8 text") from exc
        # Ids, retry and replay headers ride beside the command's fields (a retried or replayed copy
        # carries them): they describe the message, they are not part of the command.
        return flow.command.model_validate({k: v for k, v in fields.items() if k not in MESSAGE_FIELDS})
    content_type = env.headers.get("content-type")
    if content_type and content_type != "application/octet-stream" and not content_type.startswith("application/json"):
        raise InvalidMessageError(f"content type {content_type!r} is not JSON")
    return flow.command.model_validate_json(env.body)


@dataclass
class Batch:
    """The entries of one read that passed admission and validation, in order."""

    source: str
    deliveries: list[Delivery] = field(default_factory=list)
    commands: list[Message] = field(default_factory=list)


_BATCH: contextvars.ContextVar[Batch] = contextvars.ContextVar("pipeline_batch")


def current_batch() -> Batch:
    """The batch the calling subscriber function is handling."""
    return _BATCH.get()


def set_batch(batch: Batch) -> None:
    """Hand `batch` to the subscriber function FastStream calls next in this task."""
    _BATCH.set(batch)


async def batch_decoder(msg: Any, original: Any) -> list[Message]:
    """A batch subscriber's decoder: the commands the middleware validated, one by one."""
    return current_batch().commands


# Entries still running after their batch's call returned, by stream (the app drains them at shutdown).
IN_FLIGHT: dict[str, InFlight] = {}


class InFlight:
    """Entries of one stream still running after their batch's call returned."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        if len(self.tasks) >= self.max_in_flight:
            self._room.clear()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if len(self.tasks) < self.max_in_flight:
            self._room.set()

    async def room(self) -> None:
        """Wait until fewer than `max_in_flight` entries run in the background."""
        await self._room.wait()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a budget for in-flight work
        """Let what runs finish (at most `timeout` s); what is left stays pending for a reclaimer."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


async def run_batch(
    pipeline: Pipeline,
    batch: Batch,
    commands: list[Message],
    run_one: Callable[[Delivery, Message], Awaitable[None]],
    outlet: RedisOutlet,
    in_flight: InFlight,
    hold: float,
) -> None:
    """Run every entry of `batch` side by side; acknowledge what finished within `hold` s together,
    leave the rest running (each acknowledged when it ends), then wait for room in flight."""

    async def one(delivery: Delivery, cmd: Message) -> None:
        env = delivery.envelope
        bind_message(env.message_id, env.correlation_id, env.source)
        pipeline.monitor.started(env.transport, env.source)
        try:
            await pipeline.guarded(delivery, lambda: run_one(delivery, cmd))
        finally:
            pipeline.monitor.finished(env.transport, env.source)
            unbind_message()

    async def acknowledge(envs: list[Envelope]) -> None:
        try:
            await outlet.ack(batch.source, envs)
        except Exception as exc:  # noqa: BLE001 - committed: a reclaimer finds them done and acknowledges them
            log.warning("entries not acknowledged; a reclaimer will", entries=len(envs), error=repr(exc))

    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(one(d, cmd)): d.envelope for d, cmd in zip(batch.deliveries, commands, strict=True)}
    done, running = await asyncio.wait(tasks, timeout=hold)
    finished = [tasks[t] for t in done if t.exception() is None]
    outlet.release([tasks[t] for t in done if t.exception() is not None])  # left pending: reclaimed later
    if finished:
        await acknowledge(finished)
    for task in running:

        def ended(t: asyncio.Task[None], env: Envelope = tasks[task]) -> None:
            if not t.cancelled() and t.exception() is None:
                in_flight.add(loop.create_task(acknowledge([env])))
            else:
                outlet.release([env])

        task.add_done_callback(ended)
        in_flight.add(task)
    await in_flight.room()
