"""Lanes: commands decoded as FastStream decodes them, and finished deliveries acknowledged in runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pydantic import ValidationError

from handlers.errors import DeliveryRejectedError, DependencyUnavailableError, InvalidMessageError
from handlers.models import EchoModel
from schemas import SendEmail
from streams import names
from streams.deps import Adapters, install
from streams.envelope import Envelope
from streams.flows import EMAIL
from streams.lanes import HOLD_SECONDS, SECOND_BATCH_AT, RabbitLane, RedisLane, _Route, decode
from streams.outlets import DATA_KEY
from streams.routes import _send_email
from tests.unit.test_pipeline import FakeMailer, Harness
from tests.unit.test_pipeline import harness as harness  # noqa: PLC0414 - the fixture, re-exported

GOOD = {"to": "a@example.com", "subject": "hi", "body": "hello"}


def env(body: bytes = b"", content_type: str | None = None, fields: dict[bytes, bytes] | None = None) -> Envelope:
    headers = {"content-type": content_type} if content_type else {}
    return Envelope("rabbit", "email", "m-1", "m-1", body, headers, fields=fields)


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8"])
def test_json_commands_decode_with_or_without_a_json_content_type(content_type: str | None) -> None:
    cmd = decode(EMAIL, env(json.dumps(GOOD).encode(), content_type))
    assert isinstance(cmd, SendEmail)
    assert str(cmd.to) == GOOD["to"]


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (b"not json", None, ValidationError),  # unreadable JSON: invalid
        (b"[1, 2]", "application/json", ValidationError),  # JSON, but not the command's shape
        (json.dumps({**GOOD, "to": "nobody"}).encode(), None, ValidationError),  # a field fails validation
        (json.dumps(GOOD).encode(), "text/plain", InvalidMessageError),  # FastStream hands text, not a command
        (b"", None, ValidationError),  # empty body
    ],
)
def test_every_kind_of_bad_body_raises_a_decoding_error(body: bytes, content_type: str | None, error: type) -> None:
    with pytest.raises(error):
        decode(EMAIL, env(body, content_type))


def test_a_plain_stream_entry_is_read_from_its_fields() -> None:
    fields = {k.encode(): v.encode() for k, v in GOOD.items()}
    cmd = decode(EMAIL, env(fields=fields))
    assert isinstance(cmd, SendEmail)
    assert cmd.subject == "hi"


def test_a_plain_stream_entry_that_is_not_text_is_invalid() -> None:
    with pytest.raises(InvalidMessageError, match="UTF-8"):
        decode(EMAIL, env(fields={b"to": b"\xff\xfe"}))


def test_a_faststream_stream_entry_is_read_from_its_body() -> None:
    cmd = decode(EMAIL, env(json.dumps(GOOD).encode(), fields={DATA_KEY: b"(the envelope)"}))
    assert isinstance(cmd, SendEmail)
    assert cmd.body == "hello"


class FakeQueue:
    """A connection's write queue that records the acknowledgements queued on it, until it is full."""

    def __init__(self, log: list[tuple[str, int]], room: int) -> None:
        self.log = log
        self.room = room

    def put_nowait(self, frame: ChannelFrame) -> None:
        if self.room <= 0:
            raise asyncio.QueueFull
        self.room -= 1
        _, _, method = pamqp.frame.unmarshal(frame.payload)
        if isinstance(method, spec.Basic.Ack):
            self.log.append(("ack-multiple" if method.multiple else "ack", method.delivery_tag))
        else:
            assert isinstance(method, spec.Basic.Reject)
            assert method.requeue is False
            assert method.delivery_tag is not None
            self.log.append(("reject", method.delivery_tag))


class FakeChannel:
    """The aiormq channel a delivery arrived on: open or closed, its connection's queue with room or not."""

    def __init__(self, log: list[tuple[str, int]], *, room: int = 1_000, closed: bool = False) -> None:
        self.number = 1
        self.is_closed = closed
        self.write_queue = FakeQueue(log, room)


_channels: dict[tuple[int, str], FakeChannel] = {}


class FakeMessage:
    """A delivery that records how it was settled: queued on its channel's connection, or the
    awaited way (`ack`, `reject`). A channel given by name is one open channel per log and name."""

    def __init__(self, tag: int, log: list[tuple[str, int]], channel: str | FakeChannel) -> None:
        self.delivery_tag = tag
        self.log = log
        if isinstance(channel, str):
            channel = _channels.setdefault((id(log), channel), FakeChannel(log))
        self.channel = channel

    async def ack(self, multiple: bool = False) -> None:
        self.log.append(("ack-multiple" if multiple else "ack", self.delivery_tag))

    async def reject(self, requeue: bool = False) -> None:
        assert requeue is False
        self.log.append(("reject", self.delivery_tag))


def lane(prefetch: int = 64) -> RabbitLane:
    return RabbitLane(cast(Any, None), EMAIL, cast(Any, None), "email", prefetch=prefetch)


async def settle(lane_: RabbitLane, messages: list[FakeMessage], results: dict[int, bool]) -> None:
    """Deliver `messages`, finish those in `results` (tag -> ack?), flush, wait for the acks."""
    for m in messages:
        lane_._order.append(cast(Any, m))
    for tag, ok in results.items():
        lane_._done[id(messages[tag - 1])] = ok
    lane_._flush()
    if lane_._acking:
        await asyncio.wait(set(lane_._acking), timeout=2)


async def test_a_run_of_finished_deliveries_is_acknowledged_with_one_multiple_ack() -> None:
    log: list[tuple[str, int]] = []
    lane_ = lane()
    messages = [FakeMessage(t, log, "ch") for t in range(1, 101)]
    await settle(lane_, messages, dict.fromkeys(range(1, 101), True))
    assert log == [("ack-multiple", 100)]
    assert not lane_._order
    assert not lane_._done


async def test_a_rejected_delivery_breaks_the_run_and_is_rejected_before_the_next_multiple_ack() -> None:
    log: list[tuple[str, int]] = []
    messages = [FakeMessage(t, log, "ch") for t in range(1, 7)]
    results = dict.fromkeys(range(1, 7), True)
    results[4] = False
    await settle(lane(), messages, results)
    # A `multiple` ack of 6 sent before the reject of 4 would acknowledge 4 too.
    assert log == [("ack-multiple", 3), ("reject", 4), ("ack-multiple", 6)]


async def test_deliveries_behind_an_unfinished_one_wait_for_it() -> None:
    log: list[tuple[str, int]] = []
    lane_ = lane(prefetch=64)
    messages = [FakeMessage(t, log, "ch") for t in range(1, 11)]
    await settle(lane_, messages, dict.fromkeys(range(2, 11), True))  # 1 still running
    assert log == [], "nothing is acknowledged past an unfinished delivery"
    lane_._done[id(messages[0])] = True
    lane_._flush()
    assert log == [("ack-multiple", 10)]


async def test_a_slow_delivery_does_not_hold_more_than_half_the_prefetch_unacknowledged() -> None:
    log: list[tuple[str, int]] = []
    lane_ = lane(prefetch=8)
    messages = [FakeMessage(t, log, "ch") for t in range(1, 11)]
    await settle(lane_, messages, dict.fromkeys(range(2, 11), True))  # 9 finished behind a slow one
    assert sorted(log) == [("ack", t) for t in range(2, 11)]
    assert list(lane_._order) == [cast(Any, messages[0])], "the slow one is still outstanding"


async def test_a_reconnect_splits_the_run_by_channel() -> None:
    log: list[tuple[str, int]] = []
    old = [FakeMessage(t, log, "old") for t in (7, 8)]
    new = [FakeMessage(t, log, "new") for t in (1, 2, 3)]
    await settle(lane(), old + new, dict.fromkeys(range(1, 6), True))
    assert log == [("ack-multiple", 8), ("ack-multiple", 3)]


async def test_an_acknowledgement_lost_with_its_channel_is_logged_not_raised() -> None:
    class Closed(FakeMessage):
        async def ack(self, multiple: bool = False) -> None:
            raise RuntimeError("channel closed")

    lane_ = lane()
    log: list[tuple[str, int]] = []
    await settle(lane_, [Closed(1, log, FakeChannel(log, closed=True))], {1: True})
    assert not lane_._acking
    assert not lane_._order
    assert log == [], "a closed channel queues nothing; the broker delivers the message again"


async def test_acknowledgements_are_queued_on_the_connection_at_once_without_a_task() -> None:
    log: list[tuple[str, int]] = []
    lane_ = lane()
    messages = [FakeMessage(t, log, "ch") for t in range(1, 6)]
    for m in messages:
        lane_._order.append(cast(Any, m))
        lane_._done[id(m)] = m.delivery_tag != 3
    lane_._flush()
    assert log == [("ack-multiple", 2), ("reject", 3), ("ack-multiple", 5)], "queued in the flush itself"
    assert not lane_._acking


async def test_what_a_full_write_queue_cannot_take_goes_the_awaited_way_in_order() -> None:
    log: list[tuple[str, int]] = []
    channel = FakeChannel(log, room=1)
    lane_ = lane()
    messages = [FakeMessage(t, log, channel) for t in range(1, 6)]
    for m in messages:
        lane_._order.append(cast(Any, m))
        lane_._done[id(m)] = m.delivery_tag != 3
    lane_._flush()
    assert lane_._acking, "the rest waits for room"
    more = FakeMessage(6, log, channel)
    lane_._order.append(cast(Any, more))
    lane_._done[id(more)] = True
    channel.write_queue.room = 10
    lane_._flush()  # must not overtake the reject still on its way
    await asyncio.wait(set(lane_._acking), timeout=2)
    assert log == [("ack-multiple", 2), ("reject", 3), ("ack-multiple", 5), ("ack-multiple", 6)]


async def test_a_second_rabbit_batch_starts_once_enough_messages_wait_not_half_a_big_window() -> None:
    """While a batch runs, arrivals wait; at SECOND_BATCH_AT of them a second batch starts at once,
    also with a prefetch window of 128 (half of it held messages back for a whole batch)."""
    lane_ = lane(prefetch=128)
    lane_._started = True
    batches: list[int] = []
    release = asyncio.Event()

    async def work(batch: list[Any]) -> None:
        batches.append(len(batch))
        await release.wait()

    lane_._work = work  # type: ignore[method-assign]
    log: list[tuple[str, int]] = []
    for tag in range(1, SECOND_BATCH_AT + 2):
        lane_._on_message(cast(Any, FakeMessage(tag, log, "ch")))
        await asyncio.sleep(0)  # let a started batch's task run
    try:
        assert batches == [1, SECOND_BATCH_AT]
        assert lane_._pending == []
    finally:
        release.set()
        await lane_._in_flight.drain(2)
        if lane_._hold_timer is not None:
            lane_._hold_timer.cancel()


class FakeRedis:
    """XACKs recorded; XREADGROUP answers from a list, then blocks."""

    def __init__(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self.entries = entries
        self.acks: list[tuple[bytes, ...]] = []

    async def xreadgroup(self, group: str, consumer: str, streams: dict[str, str], count: int, block: int) -> Any:
        if not self.entries:
            await asyncio.sleep(block / 1000)
            return []
        batch, self.entries = self.entries[:count], self.entries[count:]
        return [(b"email", batch)]

    async def xack(self, stream: str, group: str, *ids: bytes) -> int:
        self.acks.append(ids)
        return len(ids)


async def test_a_redis_lane_acknowledges_finished_entries_together_and_leaves_failed_ones_pending() -> None:
    entries = [(f"1-{i}".encode(), {b"n": str(i).encode()}) for i in range(10)]
    client = FakeRedis(entries)
    lane_ = RedisLane(
        cast(Any, None), EMAIL, cast(Any, None), cast(Any, client), "email", "g", count=5, max_in_flight=8
    )

    class Route:
        async def process_batch(self, envs: list[Envelope]) -> list[bool]:
            await asyncio.sleep(0)
            return [env.entry_id != "1-3" for env in envs]  # 1-3: its failure could not be handled

    lane_.route = cast(Any, Route())
    await lane_.start()
    deadline = asyncio.get_running_loop().time() + 5
    while sum(len(a) for a in client.acks) < 9:
        assert asyncio.get_running_loop().time() < deadline, client.acks
        await asyncio.sleep(0.01)
    await lane_.stop(timeout=2)
    acked = [i for batch in client.acks for i in batch]
    assert sorted(acked) == sorted(e for e, _ in entries if e != b"1-3"), "the failed entry stays pending"
    assert len(client.acks) < 9, "finished entries share XACKs"


class GatedRoute:
    """Batches as the lane hands them over; each one ends when the test says so."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release: list[asyncio.Event] = []

    async def process_batch(self, envs: list[Envelope]) -> list[bool]:
        self.batches.append([env.entry_id or "" for env in envs])
        done = asyncio.Event()
        self.release.append(done)
        await done.wait()
        return [True] * len(envs)


async def _until(predicate: Any, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.005)


def _entries(first: int, n: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [(f"1-{i}".encode(), {b"n": str(i).encode()}) for i in range(first, first + n)]


@contextlib.asynccontextmanager
async def gated_lane(batches: int) -> AsyncIterator[tuple[FakeRedis, GatedRoute]]:
    """A started Redis lane over one entry, whose batches end when the test releases them."""
    client = FakeRedis(_entries(0, 1))
    gated = GatedRoute()
    lane_ = RedisLane(
        cast(Any, None),
        EMAIL,
        cast(Any, None),
        cast(Any, client),
        "email",
        "g",
        count=64,
        max_in_flight=64,
        batches=batches,
    )
    lane_.route = cast(Any, gated)
    await lane_.start()
    try:
        await _until(lambda: len(gated.batches) == 1)
        yield client, gated
    finally:
        for done in gated.release:
            done.set()
        await lane_.stop(timeout=2)


async def test_entries_that_arrive_while_a_redis_batch_runs_wait_and_form_the_next_batch() -> None:
    """While a batch runs, what arrives is not read as a batch of its own per arrival: it waits
    for the batch to end and is read as one (each batch pays its round trips once)."""
    async with gated_lane(batches=1) as (client, gated):
        client.entries.extend(_entries(1, 1))
        await asyncio.sleep(0.25)  # longer than a blocking read (100 ms): it would have been read by now
        assert len(gated.batches) == 1, "nothing is read while the batch runs"
        client.entries.extend(_entries(2, 2))
        gated.release[0].set()
        await _until(lambda: len(gated.batches) == 2)
        assert gated.batches[1] == ["1-1", "1-2", "1-3"]


async def test_a_slow_redis_batch_lets_a_second_one_start_beside_it_after_the_hold() -> None:
    """A slow handler (an LLM call) holds the others up for at most HOLD_SECONDS, and no more than
    `batches` run at once."""
    async with gated_lane(batches=2) as (client, gated):
        started = asyncio.get_running_loop().time()
        client.entries.extend(_entries(1, 1))
        await _until(lambda: len(gated.batches) == 2)
        assert asyncio.get_running_loop().time() - started >= HOLD_SECONDS * 0.9
        client.entries.extend(_entries(2, 1))  # two run: a third waits for one of them to end
        await asyncio.sleep(HOLD_SECONDS * 3)
        assert len(gated.batches) == 2
        gated.release[0].set()
        await _until(lambda: len(gated.batches) == 3)


# --- a batch through the pipeline (the app's pipeline, in-memory brokers, the test store) ------


def delivered(body: bytes, mid: str | None = None, *, redeliveries: int = 0, attempt: int = 1) -> Envelope:
    mid = mid or str(uuid.uuid4())
    headers = {"content-type": "application/json", names.H_ATTEMPTS: str(attempt)}
    return Envelope("rabbit", names.EMAIL_QUEUE, mid, mid, body, headers, attempt, redeliveries)


def route(h: Harness) -> _Route:
    return _Route(h.module.pipeline, EMAIL, _send_email)


async def test_a_batch_sends_each_good_command_once_and_parks_each_bad_one(harness: Harness) -> None:
    """One batch of every kind: good ones handled together, bad ones dead-lettered, all acknowledged."""
    good = [delivered(json.dumps(GOOD).encode()) for _ in range(5)]
    bad_json = delivered(b"{not json")
    bad_field = delivered(json.dumps({**GOOD, "to": "nobody"}).encode())
    redelivered = delivered(json.dumps(GOOD).encode(), redeliveries=1)  # one by one, and handled
    acks = await route(harness).process_batch([*good, bad_json, bad_field, redelivered])
    await harness.module.pipeline.relay.flush()
    assert acks == [True] * 8, "every delivery is settled: handled or parked"
    sent = {key for _, key in harness.mailer.sent}
    assert sent == {e.message_id for e in [*good, redelivered]}
    assert len(harness.mailer.sent) == 6, "each sent once"
    assert {e["message_id"] for e in harness.events("rabbit", names.EMAIL_SENT)} == sent
    parked = {env.message_id: headers[names.H_FAILURE_KIND] for env, headers in harness.dead_letters}
    assert parked == {bad_json.message_id: "invalid", bad_field.message_id: "invalid"}
    assert [env.body for env, _ in harness.dead_letters] == [bad_json.body, bad_field.body], "bytes intact"


async def test_a_batch_skips_what_the_inbox_already_holds(harness: Harness) -> None:
    """Redelivered or re-published after its outcome was committed: no second e-mail, no second event."""
    first = delivered(json.dumps(GOOD).encode())
    assert await route(harness).process_batch([first]) == [True]
    again = delivered(json.dumps(GOOD).encode(), first.message_id)
    other = delivered(json.dumps(GOOD).encode())
    assert await route(harness).process_batch([again, other]) == [True, True]
    await harness.module.pipeline.relay.flush()
    assert [key for _, key in harness.mailer.sent] == [first.message_id, other.message_id]
    assert len(harness.events("rabbit", names.EMAIL_SENT)) == 2


async def test_a_transient_failure_in_a_batch_is_retried_through_the_broker(harness: Harness) -> None:
    harness.mailer.error = DependencyUnavailableError("mail provider answered 503")
    batch = [delivered(json.dumps(GOOD).encode()) for _ in range(3)]
    assert await route(harness).process_batch(batch) == [True] * 3
    assert sorted(env.message_id for env, _, _ in harness.retries) == sorted(e.message_id for e in batch)
    assert all(headers[names.H_ATTEMPTS] == "2" for _, _, headers in harness.retries)
    assert harness.dead_letters == []
    ledger = harness.module.pipeline.crashes
    assert all(ledger.counts[e.message_id] == 0 for e in batch), "each run counted and uncounted"


async def test_a_fatal_failure_in_a_batch_dead_letters_that_message_only(harness: Harness) -> None:
    class PickyMailer(FakeMailer):
        async def send(self, mail: SendEmail, *, idempotency_key: str) -> str | None:
            if mail.subject == "reject me":
                raise DeliveryRejectedError("mailbox does not exist")
            return await super().send(mail, idempotency_key=idempotency_key)

    picky = PickyMailer()
    install(Adapters(mailer=picky, model=EchoModel()))
    ok = delivered(json.dumps(GOOD).encode())
    rejected = delivered(json.dumps({**GOOD, "subject": "reject me"}).encode())
    assert await route(harness).process_batch([ok, rejected]) == [True, True]
    await harness.module.pipeline.relay.flush()
    assert [key for _, key in picky.sent] == [ok.message_id]
    assert [(env.message_id, h[names.H_FAILURE_KIND]) for env, h in harness.dead_letters] == [
        (rejected.message_id, "fatal")
    ]
    assert [e["message_id"] for e in harness.events("rabbit", names.EMAIL_FAILED)] == [rejected.message_id]


async def test_a_store_outage_fails_the_batch_over_to_the_failure_policy(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome commit fails for the whole batch: each message is classified alone and retried."""
    store = harness.module.pipeline.store

    async def down(units: Any) -> list[BaseException]:
        return [ConnectionError("database is gone")] * len(units)

    monkeypatch.setattr(store, "commit_many", down)
    batch = [delivered(json.dumps(GOOD).encode()) for _ in range(2)]
    assert await route(harness).process_batch(batch) == [True, True]
    assert sorted(e.message_id for e, _, _ in harness.retries) == sorted(e.message_id for e in batch)
    assert {h[names.H_EXCEPTION_TYPE] for _, _, h in harness.retries} == {"builtins.ConnectionError"}


async def test_a_failure_that_cannot_be_handled_leaves_the_message_to_the_broker(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry cannot be scheduled either (the broker is gone too): not acknowledged, so not lost."""
    harness.mailer.error = DependencyUnavailableError("mail provider answered 503")

    async def broker_down(*_: Any) -> None:
        raise ConnectionError("broker is gone")

    monkeypatch.setattr(harness.module.rabbit_outlet, "retry_later", broker_down)
    batch = [delivered(json.dumps(GOOD).encode()) for _ in range(2)]
    assert await route(harness).process_batch(batch) == [False, False]


async def test_committed_deliveries_are_reported_done_before_their_outcomes_are_published(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox holds their outcomes once committed: the lane may acknowledge them while the
    outcomes' publish (and its confirms) is still awaited."""
    outlet = harness.module.rabbit_outlet
    publish = outlet.publish_events
    publishing, gate = asyncio.Event(), asyncio.Event()

    async def held(rows: Any) -> None:
        publishing.set()
        await gate.wait()
        await publish(rows)

    monkeypatch.setattr(outlet, "publish_events", held)
    good = [delivered(json.dumps(GOOD).encode()) for _ in range(3)]
    reported: list[list[int]] = []
    batch = asyncio.ensure_future(route(harness).process_batch(good, reported.append))
    try:
        await asyncio.wait_for(publishing.wait(), 5)
        assert reported == [[0, 1, 2]]
        assert not batch.done(), "the batch itself still waits for its outcomes to go out"
        for e in good:
            assert await harness.module.store.seen(EMAIL.name, e.message_id), "committed when reported"
    finally:
        gate.set()
    assert await asyncio.wait_for(batch, 5) == [True, True, True]
    assert {e["message_id"] for e in harness.events("rabbit", names.EMAIL_SENT)} == {e.message_id for e in good}


async def test_a_rabbit_lane_acknowledges_what_is_committed_before_its_batch_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lane_ = lane(prefetch=64)
    lane_._started = True
    log: list[tuple[str, int]] = []
    gate = asyncio.Event()

    class Route:
        async def process_batch(self, envs: list[Any], done: Any) -> list[bool]:
            done([0, 1])  # committed; the third failed and is settled later
            await gate.wait()  # the outcomes' confirms
            return [True, True, False]

    lane_.route = cast(Any, Route())
    monkeypatch.setattr("streams.lanes.RabbitOutlet.framed", staticmethod(lambda message, queue: message))
    messages = [FakeMessage(t, log, "ch") for t in (1, 2, 3)]
    for m in messages:
        m.message = None  # type: ignore[attr-defined]  # what the lane frames (not read here)
        lane_._order.append(cast(Any, m))
    work = asyncio.ensure_future(lane_._work(cast(Any, messages)))
    await _until(lambda: log == [("ack-multiple", 2)])
    assert not work.done()
    gate.set()
    await work
    if lane_._acking:
        await asyncio.wait(set(lane_._acking), timeout=2)
    assert log == [("ack-multiple", 2), ("reject", 3)]
    assert not lane_._order
    assert not lane_._done, "nothing left behind for deliveries acknowledged early"
