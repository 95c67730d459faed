"""The EventStore contract, one set of test bodies run against SQLite and PostgreSQL.

Log (versions, positions, concurrency and group commit), inbox (idempotency), dead letters,
outbox, projections (live, folded, rebuilt) and the isolation of a failing unit in a batch.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import delete, func, select, update

from schemas import (
    CompletionFailed,
    CompletionRequested,
    CompletionSucceeded,
    EmailFailed,
    Event,
    FailureKind,
    MessageDeadLettered,
    RetryScheduled,
    SendEmail,
)
from streams.core.envelope import Envelope
from streams.eventstore import projections
from streams.eventstore.store import Commit, Committed, ConcurrencyError, EventStore, Outcome, StoredEvent
from streams.eventstore.tables import dead_letters, events, outbox, task_status
from streams.policy.failures import Failure
from tests.store import email_sent, envelope, failure, new_id, projection_rows, sent

# -- helpers --------------------------------------------------------------------------------


async def outbox_event_ids(store: EventStore, message_id: str) -> list[str]:
    """Event ids of every outbox row (published or not) of one message, in outbox order."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(outbox.c.event_id).where(outbox.c.message_id == message_id).order_by(outbox.c.id)
        )
        return [r[0] for r in rows]


async def backdate_outbox(store: EventStore, seconds: float) -> None:
    """Pretend every outbox row was written `seconds` ago."""
    async with store.engine.begin() as conn:
        await conn.execute(update(outbox).values(created_at=datetime.now(UTC) - timedelta(seconds=seconds)))


def recorded(evs: Sequence[StoredEvent]) -> list[projections.Recorded]:
    """Stored events as the projections see them."""
    return [projections.Recorded(e.position, e.stream_id, e.type, e.data) for e in evs]


# -- the log --------------------------------------------------------------------------------


async def test_appends_get_consecutive_versions_and_increasing_positions(store: EventStore) -> None:
    """Sequential appends get versions 1..n per stream and strictly increasing global positions."""
    a, b = envelope(), envelope()
    commits = [
        sent("stream-a", env=a),
        sent("stream-b", env=b),
        sent("stream-a", env=a, count=3),
        sent("stream-b", env=b),
    ]
    for unit in commits:
        assert (await store.commit(unit)).outcome is Outcome.COMMITTED

    log = await store.read()
    assert [e.event_id for e in log] == [ev.event_id for unit in commits for ev in unit.events]
    positions = [e.position for e in log]
    assert positions == sorted(set(positions))
    assert [e.version for e in await store.read(stream_id="stream-a")] == [1, 2, 3, 4]
    assert [e.version for e in await store.read(stream_id="stream-b")] == [1, 2]
    first = log[0]
    assert first.type == "email.sent"
    assert first.data["event_id"] == first.event_id
    assert first.metadata["message_id"] == a.message_id
    assert first.metadata["correlation_id"] == a.correlation_id
    assert [e.position for e in await store.read(after=positions[2])] == positions[3:]
    assert len(await store.read(type_="email.sent", limit=2)) == 2


async def test_concurrent_commits_land_without_gaps(store: EventStore) -> None:
    """200 concurrent commits (150 streams, 50 to one stream) all land once, gapless per stream, in order.

    However the group commit batched them: how it batches is pinned by tests/unit/test_committer.py.
    """
    units = [sent(f"stream-{i}") if i % 4 else sent("stream-shared") for i in range(200)]
    written = store.committer.units

    results = await asyncio.gather(*(store.commit(u) for u in units))

    assert all(r.outcome is Outcome.COMMITTED for r in results)
    log = await store.read(limit=10_000)
    assert len(log) == 200
    assert len({(e.stream_id, e.version) for e in log}) == 200
    assert len({e.position for e in log}) == 200
    by_stream: dict[str, list[int]] = defaultdict(list)
    for e in log:
        by_stream[e.stream_id].append(e.version)
    assert len(by_stream) == 151
    for versions in by_stream.values():
        assert versions == list(range(1, len(versions) + 1))
    shared = await store.read(stream_id="stream-shared")
    assert [e.event_id for e in shared] == [u.events[0].event_id for u in units if u.stream_id == "stream-shared"]
    assert store.committer.units - written == 200


async def test_two_workers_appending_to_one_stream_never_fork_it(store: EventStore) -> None:
    """Two stores appending to the same streams at once: each commit lands or raises ConcurrencyError, gapless."""
    other = EventStore(store.url, owner="worker-b")
    await other.start(create=False)
    try:
        units = [sent(f"stream-{i % 3}") for i in range(40)]
        results = await asyncio.gather(
            *((store if i % 2 else other).commit(u) for i, u in enumerate(units)), return_exceptions=True
        )
    finally:
        await other.close()

    landed = {u.events[0].event_id for u, r in zip(units, results, strict=True) if isinstance(r, Committed)}
    assert all(isinstance(r, Committed | ConcurrencyError) for r in results)
    log = await store.read(limit=10_000)
    assert {e.event_id for e in log} == landed
    for stream_id in {u.stream_id for u in units}:
        versions = [e.version for e in log if e.stream_id == stream_id]
        assert versions == list(range(1, len(versions) + 1))


async def test_read_returns_aware_utc_timestamps(store: EventStore) -> None:
    """`read()` gives `recorded_at` as a timezone-aware UTC datetime on every backend."""
    await store.commit(sent())

    (stored,) = await store.read()

    assert stored.recorded_at.utcoffset() == timedelta(0)


# -- the inbox ------------------------------------------------------------------------------


async def test_sequential_redelivery_is_a_duplicate(store: EventStore) -> None:
    """The same (consumer, message id) committed twice writes one set of events and one outbox row."""
    env = envelope()
    first = sent(env=env, consumer="email")
    second = sent(env=env, consumer="email")

    assert (await store.commit(first)).outcome is Outcome.COMMITTED
    assert (await store.commit(second)).outcome is Outcome.DUPLICATE

    assert [e.event_id for e in await store.read(stream_id=first.stream_id)] == [first.events[0].event_id]
    assert await outbox_event_ids(store, env.message_id) == [first.events[0].event_id]


async def test_concurrent_redelivery_is_a_duplicate(store: EventStore) -> None:
    """Two commits of one (consumer, message id) at once, in one batch or two: the first lands, the second is
    DUPLICATE (one stream, one writer: in the order submitted)."""
    env = envelope()
    first = sent(env=env, consumer="email")
    second = sent(env=env, consumer="email")

    results = await asyncio.gather(store.commit(first), store.commit(second))

    assert [r.outcome for r in results] == [Outcome.COMMITTED, Outcome.DUPLICATE]
    assert [e.event_id for e in await store.read(stream_id=first.stream_id)] == [first.events[0].event_id]
    assert await outbox_event_ids(store, env.message_id) == [first.events[0].event_id]


async def test_a_message_committed_before_is_a_duplicate_in_a_batch_of_new_ones(store: EventStore) -> None:
    """Committed together with new messages, one whose outcome is already in the inbox is DUPLICATE and the
    others land, every outcome once: whichever batches the group commit made of them (on SQLite the
    inbox's key catches it and a batch is written again one by one; PostgreSQL reads the inbox in the
    transaction)."""
    old = envelope()
    before = sent(env=old, consumer="email")
    await store.commit(before)
    new = [envelope() for _ in range(3)]
    units = [
        sent(env=new[0], consumer="email"),
        sent(env=old, consumer="email"),
        *(sent(env=e, consumer="email") for e in new[1:]),
    ]

    results = await store.commit_many(units)

    assert [r if isinstance(r, BaseException) else r.outcome for r in results] == [
        Outcome.COMMITTED,
        Outcome.DUPLICATE,
        Outcome.COMMITTED,
        Outcome.COMMITTED,
    ]
    assert [e.event_id for e in await store.read(stream_id=before.stream_id)] == [before.events[0].event_id]
    assert await outbox_event_ids(store, old.message_id) == [before.events[0].event_id]
    for unit, env in zip((units[0], *units[2:]), new, strict=True):
        assert [e.event_id for e in await store.read(stream_id=unit.stream_id)] == [unit.events[0].event_id]
        assert await outbox_event_ids(store, env.message_id) == [unit.events[0].event_id]


async def test_redelivery_to_two_workers_sharing_the_database_is_a_duplicate(store: EventStore) -> None:
    """Two stores (workers) committing one (consumer, message id) at once: exactly one lands."""
    other = EventStore(store.url, owner="worker-b")
    await other.start(create=False)
    try:
        env = envelope()
        first = sent(env=env, consumer="email")
        second = sent(env=env, consumer="email")
        results = await asyncio.gather(store.commit(first), other.commit(second))
    finally:
        await other.close()

    assert sorted(r.outcome for r in results) == [Outcome.COMMITTED, Outcome.DUPLICATE]
    assert len(await store.read(stream_id=first.stream_id)) == 1
    assert len(await outbox_event_ids(store, env.message_id)) == 1


async def test_seen_is_per_consumer(store: EventStore) -> None:
    """`seen()` is true once a consumer committed a message, and false for other consumers and messages."""
    env = envelope()
    assert not await store.seen("email", env.message_id)

    await store.commit(sent(env=env, consumer="email"))

    assert await store.seen("email", env.message_id)
    assert not await store.seen("ai", env.message_id)
    assert not await store.seen("email", new_id())


async def test_commit_without_consumer_is_never_a_duplicate(store: EventStore) -> None:
    """Commits with consumer=None write every time and leave no inbox entry, before or after a keyed one."""
    env = envelope()
    units = [sent(env=env), sent(env=env), sent(env=env, consumer="email"), sent(env=env)]

    results = [await store.commit(u) for u in units]
    results += await asyncio.gather(store.commit(sent(env=env)), store.commit(sent(env=env)))

    assert all(r.outcome is Outcome.COMMITTED for r in results)
    assert len(await store.read(stream_id=units[0].stream_id)) == 6
    assert not await store.seen("", env.message_id)


# -- dead letters ---------------------------------------------------------------------------


async def test_a_failure_whose_text_holds_a_nul_character_is_recorded(store: EventStore) -> None:
    """A validation error quoting a NUL character (PostgreSQL refuses it in text) is still recorded."""
    bad_key = "j\x00k"
    try:
        SendEmail.model_validate({bad_key: None})
    except ValidationError as exc:
        described = Failure.of(exc, FailureKind.INVALID, envelope())
    assert "\x00" not in described.exception_message
    assert "\x00" not in described.stacktrace
    dead_letter_id = await store.record_dead_letter(envelope(), described)
    assert dead_letter_id > 0


async def test_dead_letters_are_recorded_with_their_id(store: EventStore) -> None:
    """Dead letters are kept verbatim, with or without events, and their new id is returned."""
    rabbit = envelope(attempt=5)
    redis = envelope(transport="redis", source="ai.completion", fields={b"__data__": b"\xff\x00raw"})
    alone = await store.record_dead_letter(rabbit, failure(FailureKind.EXHAUSTED, attempts=5))
    lettered = MessageDeadLettered(
        message_id=redis.message_id,
        correlation_id=redis.correlation_id,
        queue="ai.completion",
        dead_letter_queue="ai.completion.dlq",
        failure_kind=FailureKind.FATAL,
        exception_type="handlers.errors.FatalError",
        exception_message="mailbox unavailable",
        attempts=1,
    )
    done = await store.commit(Commit(f"completion-{redis.message_id}", [lettered], redis, dead_letter=failure()))

    assert done.outcome is Outcome.COMMITTED
    assert done.dead_letter_id is not None
    assert done.dead_letter_id != alone
    async with store.engine.connect() as conn:
        rows = {r["id"]: r for r in (await conn.execute(select(dead_letters))).mappings().all()}
    assert set(rows) == {alone, done.dead_letter_id}
    kept = rows[alone]
    assert (kept["message_id"], kept["correlation_id"], kept["queue"], kept["transport"]) == (
        rabbit.message_id,
        rabbit.correlation_id,
        "email",
        "rabbit",
    )
    assert (kept["kind"], kept["attempts"], kept["body"], kept["headers"]) == (
        "exhausted",
        5,
        rabbit.body,
        {"tenant": "acme"},
    )
    assert kept["fields"] is None
    assert rows[done.dead_letter_id]["fields"] == {b"__data__".hex(): b"\xff\x00raw".hex()}
    assert [e.event_id for e in await store.read(stream_id=f"completion-{redis.message_id}")] == [lettered.event_id]
    assert await outbox_event_ids(store, redis.message_id) == [lettered.event_id]


# -- the outbox -----------------------------------------------------------------------------


async def test_outbox_returns_unpublished_rows_oldest_first(store: EventStore) -> None:
    """Outbox rows come back oldest first with their payload, and go away once marked published."""
    a, b = envelope(), envelope(transport="redis")
    units = [sent(env=a, count=2), sent(env=b), sent(env=a, publish=False), sent(env=b)]
    for unit in units:
        await store.commit(unit)
    published = [ev for unit in units if unit.publish for ev in unit.events]

    pending = await store.unpublished()
    assert [p.event_id for p in pending] == [ev.event_id for ev in published]
    assert [p.id for p in pending] == sorted(p.id for p in pending)
    assert [p.transport for p in pending] == ["rabbit", "rabbit", "redis", "redis"]
    assert {p.event_type for p in pending} == {"email.sent"}
    assert [(p.message_id, p.correlation_id) for p in pending[:2]] == [(a.message_id, a.correlation_id)] * 2
    assert json.loads(pending[0].payload) == json.loads(published[0].model_dump_json())
    assert [p.id for p in await store.unpublished(limit=2)] == [p.id for p in pending[:2]]

    await store.mark_published([pending[0].event_id, pending[2].event_id])
    assert [p.id for p in await store.unpublished()] == [pending[1].id, pending[3].id]
    await store.mark_published([])
    await store.mark_published([p.event_id for p in pending])
    assert await store.unpublished() == []


async def test_outbox_backlog_counts_and_ages(store: EventStore) -> None:
    """`outbox_backlog()` counts unpublished rows and reports the age of the oldest."""
    assert await store.outbox_backlog() == (0, 0.0)
    for _ in range(3):
        await store.commit(sent())
    count, age = await store.outbox_backlog()
    assert count == 3
    assert age >= 0.0

    await backdate_outbox(store, 120)
    await store.commit(sent())
    count, age = await store.outbox_backlog()
    assert count == 4
    assert age >= 120.0

    await store.mark_published([p.event_id for p in await store.unpublished()])
    assert await store.outbox_backlog() == (0, 0.0)


async def test_orphaned_rows_are_taken_over_by_exactly_one_owner(store: EventStore) -> None:
    """Another worker's rows are left to it until older than `orphaned_after`; then one worker takes them over."""
    other = EventStore(store.url, owner="worker-b")
    third = EventStore(store.url, owner="worker-c")
    await other.start(create=False)
    await third.start(create=False)
    try:
        await store.commit(sent())
        assert await other.claim_orphans(orphaned_after=30) == 0
        assert await other.unpublished() == []
        assert len(await store.unpublished()) == 1

        await backdate_outbox(store, 60)
        assert await other.claim_orphans(orphaned_after=30) == 1
        assert await third.claim_orphans(orphaned_after=30) == 0, "taken over once, and young again"
        theirs = await other.unpublished()
        assert len(theirs) == 1
        assert await store.unpublished() == [], "the first owner no longer publishes it"

        await other.commit(sent())
        own = [p for p in await other.unpublished() if p.id != theirs[0].id]
        assert [p.id for p in await other.unpublished()] == [theirs[0].id, own[0].id]
    finally:
        await other.close()
        await third.close()


# -- projections ----------------------------------------------------------------------------


def _completion(env: Envelope, task_id: str, kind: str, **fields: object) -> Event:
    common = {"message_id": env.message_id, "correlation_id": env.correlation_id}
    if kind == "requested":
        return CompletionRequested(task_id=task_id, model="echo", **common)
    if kind == "succeeded":
        return CompletionSucceeded(task_id=task_id, model="echo", completion="42", **common)
    if kind == "failed":
        return CompletionFailed(
            task_id=task_id, model="echo", reason="refused", failure_kind=FailureKind.FATAL, **common
        )
    raise AssertionError(kind)


def _retry(env: Envelope, attempt: int) -> RetryScheduled:
    return RetryScheduled(
        message_id=env.message_id,
        correlation_id=env.correlation_id,
        queue=env.source,
        attempt=attempt,
        delay_seconds=1.5 * attempt,
        exception_type="handlers.errors.TransientError",
        exception_message="503 from upstream",
    )


def _dead(env: Envelope, attempts: int) -> MessageDeadLettered:
    return MessageDeadLettered(
        message_id=env.message_id,
        correlation_id=env.correlation_id,
        queue=env.source,
        dead_letter_queue=f"{env.source}.dlq",
        failure_kind=FailureKind.EXHAUSTED,
        exception_type="handlers.errors.TransientError",
        exception_message="gave up",
        attempts=attempts,
    )


async def _story(store: EventStore) -> tuple[dict[str, str], dict[str, str]]:
    """Commit task and e-mail histories the way the pipeline does; returns expected statuses."""
    tasks = {t: envelope(source="ai.completion") for t in ("ok", "failed", "exhausted", "poison", "one-batch")}
    mails = {m: envelope() for m in ("ok", "failed", "exhausted", "poison")}

    def task(
        name: str,
        evs: list[Event],
        *,
        publish: bool = True,
        consumer: str | None = None,
        dead_letter: Failure | None = None,
    ) -> Commit:
        return Commit(f"completion-{name}", evs, tasks[name], publish, consumer, dead_letter)

    def mail(
        name: str,
        evs: list[Event],
        *,
        publish: bool = True,
        consumer: str | None = None,
        dead_letter: Failure | None = None,
    ) -> Commit:
        return Commit(f"email-{mails[name].message_id}", evs, mails[name], publish, consumer, dead_letter)

    def req(name: str) -> Commit:
        return task(name, [_completion(tasks[name], name, "requested")], publish=False)

    def retry_t(name: str, attempt: int) -> Commit:
        return task(name, [_retry(tasks[name], attempt)], publish=False)

    def retry_m(name: str, attempt: int) -> Commit:
        return mail(name, [_retry(mails[name], attempt)], publish=False)

    t, m = tasks, mails
    # Requests and first retries share a batch; later steps land one by one, the ends together.
    await asyncio.gather(
        *(store.commit(req(n)) for n in ("ok", "failed", "exhausted", "poison")),
        *(store.commit(retry_m(n, 1)) for n in ("ok", "exhausted", "poison")),
    )
    for commit in (retry_t("ok", 1), retry_t("failed", 1), retry_t("exhausted", 1), retry_t("exhausted", 2)):
        await store.commit(commit)
    await store.commit(retry_m("exhausted", 2))
    await asyncio.gather(
        store.commit(task("ok", [_completion(t["ok"], "ok", "succeeded")], consumer="ai")),
        store.commit(task("failed", [_completion(t["failed"], "failed", "failed")], consumer="ai")),
        store.commit(
            task(
                "exhausted",
                [_completion(t["exhausted"], "exhausted", "failed"), _dead(t["exhausted"], 3)],
                dead_letter=failure(FailureKind.EXHAUSTED, 3),
            )
        ),
        store.commit(task("poison", [_dead(t["poison"], 4)], dead_letter=failure(FailureKind.POISON, 4))),
        store.commit(mail("ok", [email_sent(m["ok"])], consumer="email")),
        store.commit(
            mail(
                "failed",
                [
                    EmailFailed(
                        message_id=m["failed"].message_id,
                        correlation_id=m["failed"].correlation_id,
                        to="ada@example.com",
                        reason="550 no such user",
                        failure_kind=FailureKind.FATAL,
                    )
                ],
                consumer="email",
            )
        ),
        store.commit(mail("exhausted", [_dead(m["exhausted"], 3)], dead_letter=failure(FailureKind.EXHAUSTED, 3))),
        store.commit(mail("poison", [_dead(m["poison"], 2)], dead_letter=failure(FailureKind.POISON, 2))),
        # One task's whole history inside a single batch.
        store.commit(req("one-batch")),
        store.commit(retry_t("one-batch", 1)),
        store.commit(task("one-batch", [_completion(t["one-batch"], "one-batch", "succeeded")], consumer="ai")),
    )
    expected_tasks = {
        "ok": "succeeded",
        "failed": "failed",
        "exhausted": "failed",
        "poison": "dead-lettered",
        "one-batch": "succeeded",
    }
    expected_mails = {
        mails["ok"].message_id: "sent",
        mails["failed"].message_id: "failed",
        mails["exhausted"].message_id: "dead-lettered",
        mails["poison"].message_id: "dead-lettered",
    }
    return expected_tasks, expected_mails


async def test_live_projections_equal_the_fold_of_the_log(store: EventStore) -> None:
    """Live `task()` / `email()` after requests, retries, success, failure or dead letter equal `fold` of `read()`."""
    expected_tasks, expected_mails = await _story(store)
    folded_tasks: dict[str, projections.TaskState] = {}
    folded_mails: dict[str, projections.EmailState] = {}
    projections.fold(folded_tasks, folded_mails, recorded(await store.read(limit=10_000)))

    assert set(folded_tasks) == set(expected_tasks)
    assert set(folded_mails) == set(expected_mails)
    for task_id, status in expected_tasks.items():
        live = await store.task(task_id)
        assert live == folded_tasks[task_id]
        assert live is not None
        assert live.status == status
    for message_id, status in expected_mails.items():
        live_mail = await store.email(message_id)
        assert live_mail == folded_mails[message_id]
        assert live_mail is not None
        assert live_mail.status == status
    ok = await store.task("ok")
    assert ok is not None
    assert (ok.result, ok.model, ok.attempts, ok.reason) == ("42", "echo", 2, None)
    exhausted = await store.task("exhausted")
    assert exhausted is not None
    assert (exhausted.attempts, exhausted.reason) == (3, "refused")
    assert await store.task("never-seen") is None
    assert await store.email("never-seen") is None


async def test_rebuild_reproduces_the_live_projections(store: EventStore) -> None:
    """`projections.rebuild()` leaves the live tables as they were, and restores them when lost."""
    await _story(store)
    live = await projection_rows(store.engine)
    assert len(live["task_status"]) == 5
    assert len(live["email_log"]) == 4

    read, n_tasks, n_mails = await projections.rebuild(store.engine)

    assert (read, n_tasks, n_mails) == (len(await store.read(limit=10_000)), 5, 4)
    assert await projection_rows(store.engine) == live
    async with store.engine.begin() as conn:
        await conn.execute(delete(task_status))
    await projections.rebuild(store.engine)
    assert await projection_rows(store.engine) == live


# -- group commit isolation -----------------------------------------------------------------


async def test_a_failing_unit_fails_alone_in_its_batch(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit whose event id already exists fails its own future; the rest of its batch commits.

    Whether the three did share a transaction is the scheduler's business (tests/unit/test_committer.py
    pins that with a fake writer); here only the outcomes count.
    """
    existing = sent()
    await store.commit(existing)
    # All to the first writer (PostgreSQL has several, one per stream), so that the three may share a batch.
    monkeypatch.setattr(store.committer, "_partition", None)
    good_1, good_2 = sent(consumer="email"), sent(consumer="email")
    bad_env = envelope()
    bad = Commit(
        f"email-{bad_env.message_id}",
        [email_sent(bad_env), email_sent(bad_env, event_id=existing.events[0].event_id)],
        bad_env,
        consumer="email",
    )

    results = await asyncio.gather(
        store.commit(good_1), store.commit(bad), store.commit(good_2), return_exceptions=True
    )

    assert isinstance(results[0], Committed)
    assert results[0].outcome is Outcome.COMMITTED
    assert isinstance(results[1], ConcurrencyError)
    assert isinstance(results[2], Committed)
    assert results[2].outcome is Outcome.COMMITTED
    for unit in (good_1, good_2):
        assert len(await store.read(stream_id=unit.stream_id)) == 1
        assert await store.seen("email", unit.env.message_id)
    assert await store.read(stream_id=bad.stream_id) == []
    assert not await store.seen("email", bad_env.message_id)  # a redelivery may try again
    assert await outbox_event_ids(store, bad_env.message_id) == []
    async with store.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(events)) == 3
