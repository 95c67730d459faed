"""Dead letters kept for review: `pipeline dlq list|show|replay|purge` against a scratch SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faststream.redis.parser.binary import BinaryMessageFormatV1
from typer.testing import CliRunner, Result

from handlers.errors import FatalError, TransientError
from schemas import FailureKind
from streams import cli, deadletters
from streams.core import names
from streams.core.envelope import Envelope
from streams.core.settings import get_settings
from streams.deadletters import DeadLetter, Selection
from streams.eventstore.store import EventStore
from streams.policy.failures import Failure

runner = CliRunner()

FAILURE_HEADERS = {
    names.H_FAILURE_KIND: "exhausted",
    names.H_EXCEPTION_TYPE: "handlers.errors.TransientError",
    names.H_EXCEPTION_MESSAGE: "boom",
    names.H_EXCEPTION_STACKTRACE: "Traceback ...",
    names.H_ATTEMPTS: "5",
    names.H_FIRST_FAILURE_AT: "2024-01-01T00:00:00+00:00",
    names.H_LAST_FAILURE_AT: "2024-01-01T00:05:00+00:00",
    names.H_ORIGINAL_QUEUE: "email",
    "x-delivery-count": "3",
    "x-death": "[{'count': 1}]",
}
MAIL_BODY = b'{"to": "ada@example.com", "subject": "[Welcome]", "body": "Hi"}'


# --- building dead letters ------------------------------------------------------------------------


def rabbit_envelope(queue: str = "email", mid: str = "m-rabbit", body: bytes = MAIL_BODY) -> Envelope:
    headers = {
        "content-type": "application/json",
        names.H_MESSAGE_ID: mid,
        names.H_CORRELATION_ID: f"c-{mid}",
        "tenant": "acme",
        **FAILURE_HEADERS,
    }
    return Envelope("rabbit", queue, mid, f"c-{mid}", body, headers, attempt=5)


async def redis_envelope(
    queue: str = "ai.completion", mid: str = "m-redis", body: bytes = b"\xff\x00\x01raw"
) -> Envelope:
    inner = {names.H_MESSAGE_ID: mid, "message_id": mid, "content-type": "application/octet-stream", **FAILURE_HEADERS}
    data = await BinaryMessageFormatV1.encode(message=body, reply_to=None, headers=inner, correlation_id=f"c-{mid}")
    fields = {b"__data__": data, names.H_ATTEMPTS.encode(): b"5", b"x-exception-type": b"TransientError"}
    _, parsed = BinaryMessageFormatV1.parse(data)
    return Envelope("redis", queue, mid, f"c-{mid}", body, parsed, attempt=5, fields=fields, entry_id="1-0")


def failure(env: Envelope, kind: FailureKind, message: str = "provider down") -> Failure:
    exc_type = FatalError if kind is FailureKind.FATAL else TransientError
    try:
        raise exc_type(message)
    except exc_type as exc:
        return Failure.of(exc, kind, env)


async def record(url: str, env: Envelope, kind: FailureKind = FailureKind.EXHAUSTED, message: str = "down") -> int:
    store = EventStore(url)
    try:
        await store.start()
        return await store.record_dead_letter(env, failure(env, kind, message))
    finally:
        await store.close()


async def load(url: str, dead_letter_id: int) -> DeadLetter:
    async with deadletters.open_store(url) as engine:
        letter = await deadletters.get_letter(engine, dead_letter_id)
    assert letter is not None
    return letter


async def all_ids(url: str) -> list[int]:
    async with deadletters.open_store(url) as engine:
        return [dl.id for dl in await deadletters.letters_to_replay(engine, Selection())]


@dataclass
class Db:
    """A scratch store with four dead letters: rabbit email x2, redis ai.completion, rabbit ai.completion."""

    url: str
    ids: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    """The scratch store, also what the CLI reads (PIPELINE_DATABASE_URL); no `.env`, no caller's env."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite+aiosqlite:///{tmp_path / 'dlq.db'}"
    monkeypatch.setenv("PIPELINE_DATABASE_URL", url)
    for key in ("PIPELINE_RABBIT_URL", "PIPELINE_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()

    async def seed() -> Db:
        d = Db(url)
        d.ids["email-1"] = await record(url, rabbit_envelope(mid="m-1"), FailureKind.EXHAUSTED)
        d.ids["email-2"] = await record(url, rabbit_envelope(mid="m-2"), FailureKind.FATAL)
        d.ids["redis"] = await record(url, await redis_envelope(mid="m-3"), FailureKind.INVALID)
        d.ids["ai"] = await record(url, rabbit_envelope("ai.completion", mid="m-4"), FailureKind.FATAL)
        return d

    yield asyncio.run(seed())
    get_settings.cache_clear()


def invoke(args: list[str], stdin: str | None = None) -> Result:
    return runner.invoke(cli.app, ["dlq", *args], input=stdin)


@dataclass
class FakePublisher:
    """Stands in for `deadletters.broker_publisher`: records what would be published, can fail."""

    published: list[DeadLetter] = field(default_factory=list)
    fail_on: int | None = None
    opened: int = 0

    async def publish(self, letter: DeadLetter) -> str:
        if letter.id == self.fail_on:
            raise deadletters.BrokerError(f"cannot replay dead letter {letter.id}: broker down")
        self.published.append(letter)
        return f"{letter.transport} {letter.queue!r}"

    @asynccontextmanager
    async def __call__(self, rabbit_url: str, redis_url: str, io_timeout: float) -> AsyncIterator[Any]:
        self.opened += 1
        yield self.publish


@pytest.fixture
def publisher(monkeypatch: pytest.MonkeyPatch) -> FakePublisher:
    fake = FakePublisher()
    monkeypatch.setattr(deadletters, "broker_publisher", fake)
    return fake


# --- list -----------------------------------------------------------------------------------------------


async def test_list_filters_by_queue_and_kind_newest_first(db: Db) -> None:
    async with deadletters.open_store(db.url) as engine:
        everything = await deadletters.list_letters(engine, Selection(), 50)
        email = await deadletters.list_letters(engine, Selection(queue="email"), 50)
        fatal = await deadletters.list_letters(engine, Selection(kind="fatal"), 50)
        email_fatal = await deadletters.list_letters(engine, Selection(queue="email", kind="fatal"), 50)
        limited = await deadletters.list_letters(engine, Selection(), 2)
        assert await deadletters.count_letters(engine, Selection(kind="fatal")) == 2

    assert [dl.id for dl in everything] == sorted(db.ids.values(), reverse=True)
    assert [dl.id for dl in email] == [db.ids["email-2"], db.ids["email-1"]]
    assert [dl.id for dl in fatal] == [db.ids["ai"], db.ids["email-2"]]
    assert [dl.id for dl in email_fatal] == [db.ids["email-2"]]
    assert [dl.id for dl in limited] == [db.ids["ai"], db.ids["redis"]]


def test_cli_list_prints_a_table_of_the_matching_dead_letters(db: Db) -> None:
    result = invoke(["list", "--queue", "email"])

    assert result.exit_code == 0, result.output
    header, _rule, *rows = result.stdout.splitlines()
    for title in ("id", "transport", "queue", "kind", "attempts", "message id", "dead-lettered at", "replayed at"):
        assert title in header
    assert "exception type" in header
    assert [row.split()[:6] for row in rows] == [
        [str(db.ids["email-2"]), "rabbit", "email", "fatal", "5", "m-2"],
        [str(db.ids["email-1"]), "rabbit", "email", "exhausted", "5", "m-1"],
    ]
    assert rows[0].split()[-1] == "handlers.errors.FatalError"
    assert "2 of 2 matching dead letters" in result.stderr


def test_cli_list_kind_filter_and_limit(db: Db) -> None:
    result = invoke(["list", "--kind", "fatal", "--limit", "1"])

    assert result.exit_code == 0, result.output
    [row] = result.stdout.splitlines()[2:]
    assert row.split()[0] == str(db.ids["ai"])
    assert "1 of 2 matching dead letters" in result.stderr


def test_cli_list_with_no_match_prints_no_table(db: Db) -> None:
    result = invoke(["list", "--queue", "nope"])

    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no dead letters match" in result.stderr


def test_cli_rejects_an_unknown_kind(db: Db) -> None:
    assert invoke(["list", "--kind", "sad"]).exit_code == 2


def test_a_missing_database_file_is_an_error_and_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere.db"
    monkeypatch.setenv("PIPELINE_DATABASE_URL", f"sqlite+aiosqlite:///{missing}")
    get_settings.cache_clear()
    try:
        result = invoke(["list"])
    finally:
        get_settings.cache_clear()

    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert not missing.exists()


# --- show -----------------------------------------------------------------------------------------------


async def test_show_returns_every_column(db: Db) -> None:
    dl = await load(db.url, db.ids["email-1"])

    assert (dl.transport, dl.queue, dl.kind, dl.attempts) == ("rabbit", "email", "exhausted", 5)
    assert (dl.message_id, dl.correlation_id) == ("m-1", "c-m-1")
    assert dl.exception_type == "handlers.errors.TransientError"
    assert dl.exception_message == "down"
    assert "TransientError: down" in dl.stacktrace
    assert dl.headers["tenant"] == "acme"
    assert dl.body == MAIL_BODY
    assert dl.fields is None
    assert dl.dead_lettered_at.tzinfo is not None
    assert dl.replayed_at is None


def test_cli_show_prints_headers_stacktrace_and_text_body(db: Db) -> None:
    result = invoke(["show", str(db.ids["email-1"])])

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"dead letter {db.ids['email-1']}\n")
    for line in ("transport:         rabbit", "queue:             email", "kind:              exhausted",
                 "attempts:          5", "message id:        m-1", "correlation id:    c-m-1", "replayed at:       -",
                 "exception type:    handlers.errors.TransientError", "exception message: down",
                 "  tenant: acme", "  x-attempts: 5"):  # fmt: skip
        assert line in out
    assert "stacktrace:\n  Traceback (most recent call last):" in out
    assert f"body (utf-8, {len(MAIL_BODY)} bytes):\n{MAIL_BODY.decode()}\n" in out


def test_cli_show_prints_a_binary_body_as_hex_and_the_redis_fields(db: Db) -> None:
    result = invoke(["show", str(db.ids["redis"])])

    assert result.exit_code == 0, result.output
    assert "body (hex, 6 bytes):\nff0001726177\n" in result.stdout
    assert "redis fields:\n  __data__: <FastStream envelope" in result.stdout
    assert "  x-attempts: 5" in result.stdout


def test_cli_show_never_prints_a_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    monkeypatch.setenv("PIPELINE_DATABASE_URL", url)
    monkeypatch.setenv("PIPELINE_RABBIT_URL", "amqp://guest:hunter2@rabbit:5672/")
    get_settings.cache_clear()
    env = rabbit_envelope()
    env.headers["x-upstream"] = "https://svc:hunter2@api.example.com/v1"
    dead_letter_id = asyncio.run(record(url, env, message="cannot reach amqp://guest:hunter2@rabbit:5672/"))
    try:
        result = invoke(["show", str(dead_letter_id)])
    finally:
        get_settings.cache_clear()

    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "amqp://guest:***@rabbit:5672/" in result.stdout
    assert "https://svc:***@api.example.com/v1" in result.stdout


def test_cli_show_escapes_terminal_control_sequences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
    monkeypatch.setenv("PIPELINE_DATABASE_URL", url)
    get_settings.cache_clear()
    dead_letter_id = asyncio.run(record(url, rabbit_envelope(body=b"evil \x1b[2J body"), message="bad \x1b[31m"))
    try:
        result = invoke(["show", str(dead_letter_id)])
    finally:
        get_settings.cache_clear()

    assert "\x1b" not in result.stdout
    assert "evil \\x1b[2J body" in result.stdout


def test_cli_show_of_an_unknown_id_exits_1(db: Db) -> None:
    result = invoke(["show", "999"])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert "no dead letter 999" in result.stderr


# --- what a replay puts on the wire ------------------------------------------------------------------------


def test_replay_headers_keep_the_ids_and_drop_every_failure_header() -> None:
    headers = {names.H_MESSAGE_ID: "m", names.H_CORRELATION_ID: "c", "tenant": "acme", **FAILURE_HEADERS}
    headers |= {"x-exception-extra": "x", "x-first-death-queue": "email", "x-replayed-from": "1"}

    assert deadletters.replay_headers(headers, 42) == {
        names.H_MESSAGE_ID: "m",
        names.H_CORRELATION_ID: "c",
        "tenant": "acme",
        "x-replayed-from": "42",
    }


async def test_rabbit_replay_keeps_body_ids_and_content_type(db: Db) -> None:
    dl = await load(db.url, db.ids["email-1"])

    msg = deadletters.rabbit_replay(dl)

    assert msg.routing_key == "email"
    assert msg.body == MAIL_BODY
    assert (msg.message_id, msg.correlation_id) == ("m-1", "c-m-1")
    assert msg.content_type == "application/json"
    assert msg.headers[names.H_MESSAGE_ID] == "m-1"
    assert msg.headers[names.H_CORRELATION_ID] == "c-m-1"
    assert msg.headers["x-replayed-from"] == str(dl.id)
    assert msg.headers["tenant"] == "acme"
    assert not set(msg.headers) & set(FAILURE_HEADERS)


async def test_redis_replay_reencodes_the_envelope_with_identical_body_bytes(db: Db) -> None:
    dl = await load(db.url, db.ids["redis"])

    entry = await deadletters.redis_entry(dl)

    assert set(entry) == {b"__data__"}  # top-level failure fields are gone
    body, headers = BinaryMessageFormatV1.parse(entry[b"__data__"])
    assert body == b"\xff\x00\x01raw"
    assert body == dl.body
    assert headers["message_id"] == headers[names.H_MESSAGE_ID] == "m-3"
    assert headers["correlation_id"] == "c-m-3"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-replayed-from"] == str(dl.id)
    assert not set(headers) & set(FAILURE_HEADERS)


async def test_redis_replay_of_a_plain_entry_keeps_its_fields_and_pins_its_ids() -> None:
    fields = {b"to": b"ada@example.com", b"x-attempts": b"3", b"x-exception-type": b"E", b"message-id": b"m-9"}
    env = Envelope("redis", "email", "m-9", "m-9", b"", {}, fields=fields, entry_id="7-0")
    dl = DeadLetter(
        1, "redis", "email", "m-9", "m-9", "exhausted", "E", "e", "", 3, {}, b"",
        {k.hex(): v.hex() for k, v in (env.fields or {}).items()}, failure(env, FailureKind.EXHAUSTED).last_failure_at,
        None,
    )  # fmt: skip

    assert await deadletters.redis_entry(dl) == {
        b"to": b"ada@example.com",
        b"message-id": b"m-9",
        b"correlation-id": b"m-9",
        b"x-replayed-from": b"1",
    }


async def test_throttle_spaces_calls_to_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    throttle = deadletters.Throttle(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        await throttle.wait()
    now[0] += 1.0  # a slow publish: no wait owed after it
    await throttle.wait()

    assert slept == [0.25, 0.25]


# --- replay -----------------------------------------------------------------------------------------------


def test_replay_one_publishes_it_and_marks_it_replayed(db: Db, publisher: FakePublisher) -> None:
    result = invoke(["replay", str(db.ids["email-1"])])

    assert result.exit_code == 0, result.output
    assert [dl.id for dl in publisher.published] == [db.ids["email-1"]]
    assert result.stdout.splitlines() == [
        f"replayed {db.ids['email-1']} to rabbit 'email': message id m-1, correlation id c-m-1"
    ]
    assert "replayed 1 dead letter" in result.stderr
    assert asyncio.run(load(db.url, db.ids["email-1"])).replayed_at is not None
    assert asyncio.run(load(db.url, db.ids["email-2"])).replayed_at is None


def test_replay_all_with_filters_skips_those_already_replayed(db: Db, publisher: FakePublisher) -> None:
    assert invoke(["replay", str(db.ids["email-1"])]).exit_code == 0
    publisher.published.clear()

    result = invoke(["replay", "--all", "--queue", "email"])
    assert result.exit_code == 0, result.output
    assert [dl.id for dl in publisher.published] == [db.ids["email-2"]]

    publisher.published.clear()
    result = invoke(["replay", "--all", "--queue", "email", "--include-replayed"])
    assert result.exit_code == 0, result.output
    assert [dl.id for dl in publisher.published] == [db.ids["email-1"], db.ids["email-2"]]

    publisher.published.clear()
    result = invoke(["replay", "--all", "--kind", "invalid"])
    assert [dl.id for dl in publisher.published] == [db.ids["redis"]]


def test_replay_dry_run_changes_nothing(db: Db, publisher: FakePublisher) -> None:
    result = invoke(["replay", "--all", "--dry-run"])

    assert result.exit_code == 0, result.output
    assert publisher.opened == 0
    assert publisher.published == []
    assert [line.split()[2] for line in result.stdout.splitlines()] == [str(i) for i in sorted(db.ids.values())]
    assert "nothing was changed" in result.stderr
    for dead_letter_id in db.ids.values():
        assert asyncio.run(load(db.url, dead_letter_id)).replayed_at is None


def test_replay_stops_at_the_first_failure_and_marks_only_what_was_published(db: Db, publisher: FakePublisher) -> None:
    publisher.fail_on = db.ids["email-2"]

    result = invoke(["replay", "--all"])

    assert result.exit_code == 1
    assert [dl.id for dl in publisher.published] == [db.ids["email-1"]]
    assert f"replayed {db.ids['email-1']} to" in result.stdout
    assert "broker down (1 of 4 replayed before)" in result.stderr
    assert asyncio.run(load(db.url, db.ids["email-1"])).replayed_at is not None
    for key in ("email-2", "redis", "ai"):
        assert asyncio.run(load(db.url, db.ids[key])).replayed_at is None


def test_replay_needs_exactly_one_of_id_and_all(db: Db, publisher: FakePublisher) -> None:
    for args in (["replay"], ["replay", "1", "--all"], ["replay", "1", "--queue", "email"]):
        result = invoke(args)
        assert result.exit_code == 2, args
    assert publisher.opened == 0


def test_replay_of_an_unknown_id_exits_1(db: Db, publisher: FakePublisher) -> None:
    result = invoke(["replay", "999"])

    assert result.exit_code == 1
    assert "no dead letter 999" in result.stderr
    assert publisher.opened == 0


def test_replay_shows_a_progress_bar(db: Db, publisher: FakePublisher) -> None:
    result = invoke(["replay", "--all", "--rate", "1000"])

    assert result.exit_code == 0, result.output
    assert "replaying" in result.stderr
    assert "4/4" in result.stderr


# --- purge ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [None, "n\n", "\n"])
def test_purge_without_confirmation_deletes_nothing(db: Db, answer: str | None) -> None:
    result = invoke(["purge", "--queue", "email"], answer)

    assert result.exit_code == 1
    assert "would delete 2 dead letters" in result.stdout
    assert "nothing was deleted" in result.stderr
    assert asyncio.run(all_ids(db.url)) == sorted(db.ids.values())


def test_purge_confirmed_interactively_deletes_only_the_matching_rows(db: Db) -> None:
    result = invoke(["purge", "--kind", "fatal"], "y\n")

    assert result.exit_code == 0, result.output
    assert "    1  rabbit  ai.completion  (fatal)" in result.stdout
    assert "    1  rabbit  email  (fatal)" in result.stdout
    assert "deleted 2 dead letters from the database" in result.stdout
    assert asyncio.run(all_ids(db.url)) == sorted([db.ids["email-1"], db.ids["redis"]])


def test_purge_with_yes_does_not_ask(db: Db) -> None:
    result = invoke(["purge", "--queue", "ai.completion", "--yes"])

    assert result.exit_code == 0, result.output
    assert "[y/N]" not in result.stdout
    assert asyncio.run(all_ids(db.url)) == sorted([db.ids["email-1"], db.ids["email-2"]])


async def test_purge_spares_dead_letters_that_arrive_after_the_plan(db: Db) -> None:
    async with deadletters.open_store(db.url) as engine:
        plan = await deadletters.plan_purge(engine, Selection(queue="email"))
    late = await record(db.url, rabbit_envelope(mid="m-late"))
    async with deadletters.open_store(db.url) as engine:
        deleted = await deadletters.purge(engine, plan)

    assert deleted == 2
    assert await all_ids(db.url) == sorted([db.ids["redis"], db.ids["ai"], late])


def test_purge_with_broker_queues_describes_and_empties_the_dead_letter_queues(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[tuple[str, str]], bool]] = []

    async def fake_broker_dlqs(
        targets: list[tuple[str, str]], rabbit_url: str, redis_url: str, io_timeout: float, *, purge: bool
    ) -> dict[tuple[str, str], int | None]:
        calls.append((list(targets), purge))
        return {("rabbit", "email.dlq"): 7}

    monkeypatch.setattr(deadletters, "broker_dlqs", fake_broker_dlqs)

    declined = invoke(["purge", "--queue", "email", "--broker-queues"], "n\n")
    assert declined.exit_code == 1
    assert "would empty RabbitMQ queue 'email.dlq' (7 messages in it now, of every kind)" in declined.stdout
    assert calls == [([("rabbit", "email.dlq")], False)]

    calls.clear()
    result = invoke(["purge", "--queue", "email", "--broker-queues", "--yes"])
    assert result.exit_code == 0, result.output
    assert calls == [([("rabbit", "email.dlq")], False), ([("rabbit", "email.dlq")], True)]
    assert "emptied RabbitMQ queue 'email.dlq': 7 messages removed" in result.stdout
    assert asyncio.run(all_ids(db.url)) == sorted([db.ids["redis"], db.ids["ai"]])


def test_purge_with_no_match_asks_nothing(db: Db) -> None:
    result = invoke(["purge", "--queue", "nope"])

    assert result.exit_code == 0
    assert result.stdout == ""
    assert "nothing to purge" in result.stderr


def test_purge_plan_names_the_broker_queues_of_the_matching_rows(db: Db) -> None:
    async def plan() -> deadletters.PurgePlan:
        async with deadletters.open_store(db.url) as engine:
            return await deadletters.plan_purge(engine, Selection())

    assert asyncio.run(plan()).broker_queues == [
        ("rabbit", "ai.completion.dlq"),
        ("rabbit", "email.dlq"),
        ("redis", "ai.completion.dlq"),
    ]
