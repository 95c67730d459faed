"""A flow is declared once: a throwaway third flow (a schema, a handler, one declaration) runs on both
brokers under FastStream's TestBroker, with its dependency given through FastStream's provider;
and a slow call never holds up the quick ones beside it on the same stream."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from faststream.rabbit import TestRabbitBroker
from faststream.redis import TestRedisBroker
from faststream.redis.parser.binary import BinaryMessageFormatV1
from pydantic import ValidationError

from handlers.ports import CompletionModel
from schemas import Event, FailureKind, MessageContext, RequestCompletion
from schemas.base import Message
from streams.consume.batches import decode
from streams.core import names
from streams.eventstore.store import EventStore
from streams.flows.catalog import EMAIL
from streams.flows.deps import get_mailer, get_model
from streams.flows.flow import Flow
from streams.transport import topology
from streams.transport.outlets import RedisOutlet
from tests.conftest import CountingLedger, RecordingRedis


class Shout(Message):
    """The throwaway command: say `text` louder."""

    text: str


class Shouted(Event):
    """Its outcome."""

    TYPE: ClassVar[str] = "shout.done"
    text: str


class ShoutFailed(Event):
    """Its failure."""

    TYPE: ClassVar[str] = "shout.failed"
    reason: str


async def shout(cmd: Shout, ctx: MessageContext, mailer: Any) -> Shouted:
    """The handler: free of broker code, its dependency handed in."""
    await mailer.send(cmd, idempotency_key=ctx.message_id)
    return Shouted(message_id=ctx.message_id, correlation_id=ctx.correlation_id, text=cmd.text.upper())


SHOUT: Flow[Shout] = Flow(
    name="shout",
    command=Shout,
    handler=shout,
    dependency="mailer",
    provide=get_mailer,
    queue="shout",
    stream="shout",
    group="shout-workers",
    stream_id=lambda cmd, ctx: f"shout-{ctx.message_id}",
    failed=lambda cmd, ctx, kind, reason: ShoutFailed(
        message_id=ctx.message_id, correlation_id=ctx.correlation_id, reason=reason
    ),
    outcomes=(Shouted, ShoutFailed),
)


class Recorder:
    """A mailer that records what it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, str]] = []

    async def send(self, mail: Any, *, idempotency_key: str) -> str:
        self.sent.append((mail, idempotency_key))
        return "ok"


@pytest.fixture
async def app(app_store: EventStore, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    from streams import app as module
    from streams.consume.routes import register

    if "rabbit:shout" not in module.subscribers:  # the app's own brokers, declared once a session
        module.subscribers.update(
            register(
                module.rabbit,
                module.redis,
                module.pipeline,
                module.settings,
                module.publishers,
                consumer="test",
                flows=[SHOUT],
            )
        )
    monkeypatch.setattr(module.redis_outlet, "client", RecordingRedis())
    monkeypatch.setattr(module.pipeline, "crashes", CountingLedger())
    module.pipeline.breakers.clear()
    async with TestRabbitBroker(module.rabbit), TestRedisBroker(module.redis):
        yield module


def _redis_events(module: Any, event_type: str) -> list[dict[str, Any]]:
    found = []
    for stream, fields in module.redis_outlet.client.added:
        if stream == names.EVENTS_STREAM:
            body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
            if headers.get(names.H_EVENT_TYPE) == event_type:
                found.append(json.loads(body))
    return found


async def test_a_third_flow_declared_once_runs_on_both_brokers(app: Any) -> None:
    recorder = Recorder()
    app.rabbit.provider.override(get_mailer, lambda: recorder)  # FastStream's dependency override
    try:
        rabbit_id, redis_id = str(uuid.uuid4()), str(uuid.uuid4())
        await app.rabbit.publish({"text": "hi"}, exchange=topology.TASKS, routing_key="shout", message_id=rabbit_id)
        await app.redis.publish({"text": "ho"}, stream="shout", headers={"message-id": redis_id})
        await app.rabbit.publish({"txt": "typo"}, exchange=topology.TASKS, routing_key="shout")  # invalid
        await app.pipeline.relay.flush()
    finally:
        app.rabbit.provider.clear()
    assert [(m.text, key) for m, key in recorder.sent] == [("hi", rabbit_id), ("ho", redis_id)]
    published = app.publishers.rabbit_events["shout.done"].mock.call_args_list
    assert [c.args[0]["text"] for c in published] == ["HI"]
    assert [e["text"] for e in _redis_events(app, "shout.done")] == ["HO"]
    # Bad input on the new flow is parked like any other: dead letter and `message.dead_lettered`.
    parked = app.publishers.rabbit_dead_letters["shout"].mock.call_args_list
    assert len(parked) == 1
    assert parked[0].args[0] == {"txt": "typo"}  # as TestRabbitBroker's recorder decodes it
    kinds = [
        c.args[0]["failure_kind"] for c in app.publishers.rabbit_events["message.dead_lettered"].mock.call_args_list
    ]
    assert kinds[-1] == FailureKind.INVALID.value


class SlowFirstModel:
    """A completion model whose call for the prompt `slow` waits until released (an LLM call of 30 s)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started_slow = asyncio.Event()

    async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Any:
        if prompt == "slow":
            self.started_slow.set()
            await self.release.wait()
        return await _echo().complete(prompt, model=model, idempotency_key=idempotency_key)


def _echo() -> CompletionModel:
    from handlers.models import EchoModel

    return EchoModel()


@pytest.mark.parametrize("broker", ["rabbit", "redis"])
async def test_a_slow_call_does_not_hold_up_the_quick_ones_on_its_queue(app: Any, broker: str) -> None:
    model = SlowFirstModel()
    app.rabbit.provider.override(get_model, lambda: model)

    async def send(prompt: str) -> str:
        task_id = str(uuid.uuid4())
        body = RequestCompletion(task_id=task_id, prompt=prompt, model="echo").model_dump()
        if broker == "rabbit":
            await app.rabbit.publish(body, exchange=topology.TASKS, routing_key=names.COMPLETION_QUEUE)
        else:
            await app.redis.publish(body, stream=names.COMPLETION_STREAM)
        return task_id

    try:
        slow = asyncio.create_task(send("slow"))
        await asyncio.wait_for(model.started_slow.wait(), 5)
        quick = [await asyncio.wait_for(send(f"quick {i}"), 5) for i in range(5)]  # each done while `slow` waits
        await app.pipeline.relay.flush()
        done = {e["task_id"] for e in _succeeded(app, broker)}
        assert set(quick) <= done
        assert not slow.done()
        model.release.set()
        slow_id = await asyncio.wait_for(slow, 5)
        await app.pipeline.relay.flush()
        assert slow_id in {e["task_id"] for e in _succeeded(app, broker)}
    finally:
        model.release.set()
        app.rabbit.provider.clear()


def _succeeded(app: Any, broker: str) -> list[dict[str, Any]]:
    if broker == "rabbit":
        return [c.args[0] for c in app.publishers.rabbit_events["completion.succeeded"].mock.call_args_list]
    return _redis_events(app, "completion.succeeded")


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"message_id": "m-1", "correlation_id": "c-1"},  # ids a plain producer sets beside the fields
        {"x-attempts": "2", "x-first-failure-at": "2026-01-01T00:00:00+00:00", "message-id": "m-1"},  # a retry
        {"x-replayed-from": "17", "message-id": "m-1"},  # a replayed dead letter
    ],
)
def test_a_plain_stream_entry_is_its_command_beside_its_message_headers(extra: dict[str, str]) -> None:
    """A plain entry's fields are the command; the ids, retry and replay headers beside them are not."""
    fields = {b"to": b"ada@example.com", b"subject": b"Hi", b"body": b"Hello"}
    fields.update({k.encode(): v.encode() for k, v in extra.items()})
    env = RedisOutlet.entry(names.EMAIL_STREAM, "1-0", fields)
    cmd = decode(EMAIL, env)
    assert (str(cmd.to), cmd.subject, cmd.body) == ("ada@example.com", "Hi", "Hello")


def test_a_plain_stream_entry_with_a_field_the_command_does_not_know_is_invalid() -> None:
    """Unknown fields are still refused: only the message's own headers are set aside."""
    env = RedisOutlet.entry(
        names.EMAIL_STREAM,
        "1-0",
        {b"to": b"ada@example.com", b"subject": b"Hi", b"body": b"x", b"cc": b"b@example.com"},
    )
    with pytest.raises(ValidationError):
        decode(EMAIL, env)
