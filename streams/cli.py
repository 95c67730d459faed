"""`pipeline`: the operator's command line (Typer).

`pipeline send email|completion ...` validates a command with the same Pydantic models the
workers use, then publishes it to RabbitMQ (exchange `tasks`) or Redis Streams, exactly as a
producer should: persistent, confirmed, with a message id (the idempotency key) and a
correlation id. The message id is the only thing written to stdout, so scripts can capture it:

    MID=$(pipeline send email --to ada@example.com --subject Hi --body Hello)

Everything else (where it went, how to watch the outcome, errors) goes to stderr.
Exit codes: 0 published, 1 broker unreachable or refused the message, 2 invalid input or
settings (nothing is published).

`pipeline dlq list|show|replay|purge` reviews the dead letters kept in PIPELINE_DATABASE_URL,
puts them back through the normal path (same message and correlation ids, attempt count reset)
and deletes them, only once confirmed. Exit codes: 0 done, 1 not found, database or broker
unavailable, purge not confirmed, 2 invalid input or settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TypeVar

import aiormq
import typer
from faststream.rabbit import RabbitBroker
from faststream.redis import RedisBroker
from pydantic import ValidationError
from redis.exceptions import RedisError
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from schemas import Command, FailureKind, RequestCompletion, SendEmail
from streams import deadletters, names
from streams.deadletters import DeadLetter, PurgePlan, Selection
from streams.settings import Settings, get_settings, mask_url

CONTENT_TYPE = "application/json"
DEFAULT_TIMEOUT = 10.0
EXIT_UNAVAILABLE = 1
EXIT_INVALID = 2
_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII: fits AMQP shortstr and any header
_QUIET_LOGGERS = ("aiormq", "aio_pika", "faststream")

C = TypeVar("C", SendEmail, RequestCompletion)
T = TypeVar("T")


class Broker(StrEnum):
    """Where a command is published."""

    rabbit = "rabbit"
    redis = "redis"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one command type goes on each broker, and which events answer it."""

    routing_key: str  # on exchange `tasks`
    stream: str
    outcomes: tuple[str, str]


ROUTES: dict[type[SendEmail] | type[RequestCompletion], Route] = {
    SendEmail: Route(names.EMAIL_QUEUE, names.EMAIL_STREAM, (names.EMAIL_SENT, names.EMAIL_FAILED)),
    RequestCompletion: Route(
        names.COMPLETION_QUEUE,
        names.COMPLETION_STREAM,
        (names.COMPLETION_SUCCEEDED, names.COMPLETION_FAILED),
    ),
}


class PublishError(Exception):
    """The broker could not be reached or did not take the message; the text is shown as is."""


app = typer.Typer(
    name="pipeline",
    help="Operate the message pipeline: publish commands to RabbitMQ or Redis Streams; review and replay dead letters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
send_app = typer.Typer(
    help="Validate a command and publish it (prints the message id on stdout).",
    no_args_is_help=True,
)
app.add_typer(send_app, name="send")
dlq_app = typer.Typer(
    help="Review, replay and purge dead letters (kept in the database at PIPELINE_DATABASE_URL).",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")


# --- publishing ---------------------------------------------------------------------------------


@contextmanager
def _quiet_client_logs() -> Iterator[None]:
    """Keep the client libraries' own error logs (and tracebacks) off the terminal."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _headers(message_id: str, correlation_id: str) -> dict[str, Any]:
    return {names.H_MESSAGE_ID: message_id, names.H_CORRELATION_ID: correlation_id}


async def _publish_rabbit(
    url: str, route: Route, payload: dict[str, Any], *, message_id: str, correlation_id: str, io_timeout: float
) -> str:
    where = f"exchange {names.TASKS_EXCHANGE!r}, routing key {route.routing_key!r} on {mask_url(url)}"
    try:
        async with RabbitBroker(url, timeout=io_timeout, logger=None) as broker:
            # Publisher confirms are on by default; the exchange is declared passively (the
            # worker owns the topology), and `mandatory` makes an unroutable message come back.
            result = await broker.publish(
                payload,
                exchange=names.TASKS_EXCHANGE,
                routing_key=route.routing_key,
                mandatory=True,
                persist=True,
                timeout=io_timeout,
                message_id=message_id,
                correlation_id=correlation_id,
                content_type=CONTENT_TYPE,
                headers=_headers(message_id, correlation_id),
            )
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise PublishError(
            f"RabbitMQ at {mask_url(url)} has no exchange {names.TASKS_EXCHANGE!r} ({exc}): "
            "start the worker once, it declares the topology"
        ) from exc
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise PublishError(f"RabbitMQ at {mask_url(url)} refused the credentials: {exc}") from exc
    except TimeoutError as exc:  # the connection or the publisher confirm
        raise PublishError(_unanswered(Broker.rabbit, url, io_timeout, message_id)) from exc
    except (aiormq.exceptions.AMQPError, OSError) as exc:
        raise PublishError(f"cannot publish to RabbitMQ at {mask_url(url)}: {_reason(exc)}") from exc
    if isinstance(result, aiormq.abc.DeliveredMessage):  # basic.return: no queue is bound
        raise PublishError(
            f"RabbitMQ returned the message: no queue is bound to {where}; start the worker once, "
            "it declares the topology"
        )
    return f"{where} (persistent, confirmed)"


async def _publish_redis(
    url: str, route: Route, payload: dict[str, Any], *, message_id: str, correlation_id: str, io_timeout: float
) -> str:
    headers = {**_headers(message_id, correlation_id), "message_id": message_id}
    try:
        async with RedisBroker(
            url,
            socket_connect_timeout=io_timeout,
            socket_timeout=io_timeout,
            logger=None,  # type: ignore[arg-type]  # None turns FastStream's logging off, as on Rabbit
        ) as broker:
            entry_id = await broker.publish(
                payload, stream=route.stream, headers=headers, correlation_id=correlation_id
            )
    except (RedisError, OSError, TimeoutError) as exc:
        raise PublishError(f"cannot publish to Redis at {mask_url(url)}: {_reason(exc)}") from exc
    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return f"stream {route.stream!r} (entry {entry}) on {mask_url(url)}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc.__context__ or exc)
    return " ".join(text.split())  # one line


def publish(
    broker: Broker,
    command: Command,
    *,
    message_id: str,
    correlation_id: str,
    settings: Settings,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Publish one validated command; return where it went. Raises `PublishError`."""
    route = ROUTES[type(command)]
    payload = command.model_dump(mode="json")
    with _quiet_client_logs():
        publisher = _publish_rabbit if broker is Broker.rabbit else _publish_redis
        url = settings.rabbit_url if broker is Broker.rabbit else settings.redis_url
        coro = publisher(url, route, payload, message_id=message_id, correlation_id=correlation_id, io_timeout=timeout)
        try:
            return asyncio.run(asyncio.wait_for(coro, timeout * 3))
        except TimeoutError as exc:
            raise PublishError(_unanswered(broker, url, timeout * 3, message_id)) from exc


def _unanswered(broker: Broker, url: str, seconds: float, message_id: str) -> str:
    return (
        f"no answer from {broker.value} at {mask_url(url)} within {seconds:g}s; it may have the message "
        f"anyway: re-send with --message-id {message_id}, the pipeline drops duplicates"
    )


# --- shared option handling ---------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _text(value: str) -> str:
    """`-` means: read the text from stdin."""
    return sys.stdin.read() if value == "-" else value


def _id_problems(message_id: str | None, correlation_id: str | None) -> list[str]:
    return [
        f"invalid {option}: use 1 to 255 visible ASCII characters, no spaces [got {value!r}]"
        for option, value in (("--message-id", message_id), ("--correlation-id", correlation_id))
        if value is not None and not _ID_PATTERN.match(value)
    ]


def _model_problems(model: type[C], exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = err["loc"]
        field = ".".join(str(p) for p in loc)
        option = "--" + str(loc[0]).replace("_", "-") if loc else model.__name__
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        problems.append(f"invalid {option} (field {field!r} of {model.__name__}): {err['msg']} [got {shown}]")
    return problems


def _prepare(
    model: type[C], fields: dict[str, Any], message_id: str | None, correlation_id: str | None
) -> tuple[C, str, str]:
    """The validated command and its ids; on any invalid input, report every problem and exit 2."""
    mid = message_id if message_id is not None else str(uuid.uuid4())
    cid = correlation_id if correlation_id is not None else mid
    problems = _id_problems(message_id, correlation_id)
    command: C | None = None
    try:
        command = model.model_validate(fields)
    except ValidationError as exc:
        problems += _model_problems(model, exc)
    if problems or command is None:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        typer.echo("nothing was published", err=True)
        raise typer.Exit(EXIT_INVALID)
    return command, mid, cid


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"PIPELINE_{str(e['loc'][0]).upper()}: " if e["loc"] else "") + e["msg"] for e in exc.errors()
        )
        _fail(f"invalid settings: {problems}", EXIT_INVALID)


def _send(command: SendEmail | RequestCompletion, broker: Broker, mid: str, cid: str, timeout: float) -> None:
    settings = _settings()
    size = len(command.model_dump_json().encode())
    if size > settings.max_body_bytes:
        _fail(
            f"the command is {size} bytes, over PIPELINE_MAX_BODY_BYTES={settings.max_body_bytes}: "
            "the workers would dead-letter it",
            EXIT_INVALID,
        )
    try:
        where = publish(broker, command, message_id=mid, correlation_id=cid, settings=settings, timeout=timeout)
    except PublishError as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    route = ROUTES[type(command)]
    typer.echo(mid)
    typer.echo(f"published {type(command).__name__} to {where}", err=True)
    typer.echo(f"message id {mid}, correlation id {cid}", err=True)
    if isinstance(command, RequestCompletion):
        typer.echo(f"task id {command.task_id}", err=True)
    outcome = " or ".join(route.outcomes)
    if broker is Broker.rabbit:
        watch = (
            f"watch for {outcome} with message_id {mid} on topic exchange {names.EVENTS_EXCHANGE!r} "
            f"(bind a queue with routing key {route.outcomes[0].split('.')[0]}.#); "
            f"dead letters land in queue {names.dlq(route.routing_key)!r}"
        )
    else:
        watch = (
            f"watch for {outcome} with message_id {mid} on stream {names.EVENTS_STREAM!r} "
            f"(redis-cli XREVRANGE {names.EVENTS_STREAM} + - COUNT 20); "
            f"dead letters land on stream {names.dlq(route.stream)!r}"
        )
    typer.echo(f"hint: {watch}", err=True)


BrokerOpt = Annotated[
    Broker, typer.Option("--broker", "-b", help="Publish to RabbitMQ (exchange `tasks`) or Redis Streams.")
]
MessageIdOpt = Annotated[
    str | None,
    typer.Option(
        "--message-id",
        help="Idempotency key (default: a new uuid4). Re-sending the same id has no second effect.",
    ),
]
CorrelationIdOpt = Annotated[
    str | None, typer.Option("--correlation-id", help="Correlation id (default: the message id).")
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the connection and the broker's confirm."),
]


# --- commands -----------------------------------------------------------------------------------


@send_app.command("email")
def send_email(
    *,
    to: Annotated[str, typer.Option("--to", help="Recipient address.")],
    subject: Annotated[str, typer.Option("--subject", help="Subject line (one line).")],
    body: Annotated[str, typer.Option("--body", help="Plain-text body; `-` reads it from stdin.")],
    template: Annotated[str | None, typer.Option("--template", help="Template name the mail provider renders.")] = None,
    broker: BrokerOpt = Broker.rabbit,
    message_id: MessageIdOpt = None,
    correlation_id: CorrelationIdOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Publish a SendEmail command (answered by email.sent or email.failed)."""
    fields: dict[str, Any] = {"to": to, "subject": subject, "body": _text(body), "template": template}
    command, mid, cid = _prepare(SendEmail, fields, message_id, correlation_id)
    _send(command, broker, mid, cid, timeout)


@send_app.command("completion")
def send_completion(
    *,
    prompt: Annotated[str, typer.Option("--prompt", help="The user prompt; `-` reads it from stdin.")],
    model: Annotated[
        str, typer.Option("--model", help="Model name; `echo` is the built-in deterministic model.")
    ] = "echo",
    task_id: Annotated[
        str | None, typer.Option("--task-id", help="Task id the result is kept under (default: a new uuid4).")
    ] = None,
    broker: BrokerOpt = Broker.rabbit,
    message_id: MessageIdOpt = None,
    correlation_id: CorrelationIdOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Publish a RequestCompletion command (answered by completion.succeeded or completion.failed)."""
    fields: dict[str, Any] = {
        "task_id": task_id if task_id is not None else str(uuid.uuid4()),
        "prompt": _text(prompt),
        "model": model,
    }
    command, mid, cid = _prepare(RequestCompletion, fields, message_id, correlation_id)
    _send(command, broker, mid, cid, timeout)


# --- dead letters: output ------------------------------------------------------------------------

EXIT_NOT_FOUND = 1
PIPED_WIDTH = 240  # no terminal to fit: keep each row on one line


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


def _render(table: Table) -> str:
    """The table as text for stdout, without rich's trailing padding."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPED_WIDTH)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def _letters_table(letters: Sequence[DeadLetter]) -> Table:
    """The `dlq list` table; cells are Text, so nothing in them is read as markup."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for title in ("id", "transport", "queue", "kind", "attempts", "message id"):
        table.add_column(title, overflow="fold", justify="right" if title in {"id", "attempts"} else "left")
    for title in ("dead-lettered at", "replayed at", "exception type"):
        table.add_column(title, overflow="fold")
    for dl in letters:
        cells = (
            str(dl.id), dl.transport, dl.queue, dl.kind, str(dl.attempts), dl.message_id,
            _when(dl.dead_lettered_at), _when(dl.replayed_at), dl.exception_type,
        )  # fmt: skip
        table.add_row(*(Text(deadletters.printable(c)) for c in cells))
    return table


def _field_value(key: bytes, value: bytes) -> str:
    if key == deadletters.DATA_KEY:
        return f"<FastStream envelope, {len(value)} bytes: headers and body below>"
    encoding, text = deadletters.body_text(value)
    return deadletters.redact(text) if encoding == "utf-8" else f"<hex> {text}"


def describe(dl: DeadLetter) -> list[str]:
    """Every column of a dead letter, as `dlq show` prints it: URL passwords masked, escapes shown."""

    def safe(value: object) -> str:
        return deadletters.printable(deadletters.redact(str(value)))

    lines = [f"dead letter {dl.id}"]
    facts = {
        "transport": dl.transport, "queue": dl.queue, "kind": dl.kind, "attempts": dl.attempts,
        "message id": dl.message_id, "correlation id": dl.correlation_id,
        "dead-lettered at": dl.dead_lettered_at.isoformat(),
        "replayed at": dl.replayed_at.isoformat() if dl.replayed_at else "-",
        "exception type": dl.exception_type, "exception message": dl.exception_message,
    }  # fmt: skip
    lines += [f"  {k + ':':<19}{safe(v)}" for k, v in facts.items()]
    lines += ["headers:"] + [f"  {safe(k)}: {safe(v)}" for k, v in sorted(dl.headers.items())]
    if dl.fields is not None:
        fields = deadletters.decode_fields(dl.fields)
        lines += ["redis fields:"] + [f"  {safe(k.decode('utf-8', 'replace'))}: {safe(_field_value(k, v))}"
                                      for k, v in fields.items()]  # fmt: skip
    lines += ["stacktrace:"] + [f"  {line}" for line in safe(dl.stacktrace).splitlines()]
    encoding, body = deadletters.body_text(dl.body)
    lines += [f"body ({encoding}, {len(dl.body)} bytes):", body]
    return lines


def _one_line(dl: DeadLetter) -> str:
    again = f", replayed before at {_when(dl.replayed_at)}" if dl.replayed_at else ""
    return f"{dl.id} ({dl.transport} {dl.queue!r}, {dl.kind}, message id {deadletters.printable(dl.message_id)}{again})"


def _purge_description(plan: PurgePlan, sizes: dict[tuple[str, str], int | None], database: str) -> list[str]:
    lines = [f"would delete {_n(plan.total, 'dead letter')} from the database at {database}:"]
    lines += [f"  {g.count:>5}  {g.transport:<6}  {g.queue}  ({g.kind})" for g in plan.groups]
    for (transport, name), size in sorted(sizes.items()):
        now = "it does not exist" if size is None else f"{_n(size, 'message')} in it now, of every kind"
        action = f"empty RabbitMQ queue {name!r}" if transport == "rabbit" else f"trim Redis stream {name!r} to 0"
        lines.append(f"would {action} ({now})")
    return lines


# --- dead letters: running the operations -------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one dead-letter operation; its failure is one line on stderr and exit 1."""
    with _quiet_client_logs():
        try:
            return asyncio.run(coro)
        except deadletters.DeadLetterError as exc:
            _fail(str(exc), EXIT_UNAVAILABLE)


async def _list(url: str, selection: Selection, limit: int) -> tuple[list[DeadLetter], int]:
    async with deadletters.open_store(url) as engine:
        letters = await deadletters.list_letters(engine, selection, limit)
        return letters, await deadletters.count_letters(engine, selection)


async def _get(url: str, dead_letter_id: int) -> DeadLetter | None:
    async with deadletters.open_store(url) as engine:
        return await deadletters.get_letter(engine, dead_letter_id)


def _letter(settings: Settings, dead_letter_id: int) -> DeadLetter:
    """The dead letter with this id; when there is none, say so and exit 1."""
    letter = _run(_get(settings.database_url, dead_letter_id))
    if letter is None:
        _fail(f"no dead letter {dead_letter_id} in the database at {mask_url(settings.database_url)}", EXIT_NOT_FOUND)
    return letter


async def _to_replay(url: str, selection: Selection) -> list[DeadLetter]:
    async with deadletters.open_store(url) as engine:
        return await deadletters.letters_to_replay(engine, selection)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), redirect_stdout=False, redirect_stderr=False,
    )  # fmt: skip


async def _replay(
    settings: Settings, letters: Sequence[DeadLetter], rate: float | None, io_timeout: float, done: list[str]
) -> None:
    """Replay `letters` in order behind a progress bar; `done` gets one line per replayed letter."""
    async with (
        deadletters.open_store(settings.database_url) as engine,
        deadletters.broker_publisher(settings.rabbit_url, settings.redis_url, io_timeout) as publish,
    ):
        with _progress() as progress:
            task = progress.add_task("replaying", total=len(letters))

            def replayed(dl: DeadLetter, where: str) -> None:
                ids = f"message id {dl.message_id}, correlation id {dl.correlation_id}"
                done.append(f"replayed {dl.id} to {where}: {ids}")
                progress.advance(task)

            try:
                await deadletters.replay(
                    engine, letters, publish, throttle=deadletters.Throttle(rate), on_replayed=replayed
                )
            except deadletters.DeadLetterError as exc:
                raise deadletters.DeadLetterError(f"{exc} ({len(done)} of {len(letters)} replayed before)") from exc


async def _plan_purge(
    settings: Settings, selection: Selection, broker_queues: bool, io_timeout: float
) -> tuple[PurgePlan, dict[tuple[str, str], int | None]]:
    async with deadletters.open_store(settings.database_url) as engine:
        plan = await deadletters.plan_purge(engine, selection)
    if not broker_queues or not plan.total:
        return plan, {}
    sizes = await deadletters.broker_dlqs(
        plan.broker_queues, settings.rabbit_url, settings.redis_url, io_timeout, purge=False
    )
    return plan, sizes


async def _purge(
    settings: Settings, plan: PurgePlan, broker_queues: bool, io_timeout: float
) -> tuple[int, dict[tuple[str, str], int | None]]:
    """Broker queues first: if that fails, the rows (the review copy) are all still there."""
    purged: dict[tuple[str, str], int | None] = {}
    if broker_queues:
        purged = await deadletters.broker_dlqs(
            plan.broker_queues, settings.rabbit_url, settings.redis_url, io_timeout, purge=True
        )
    async with deadletters.open_store(settings.database_url) as engine:
        return await deadletters.purge(engine, plan), purged


def _confirmed(question: str) -> bool:
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:  # end of input: no answer is not a yes
        typer.echo()
        return False


def _selection(queue: str | None, kind: FailureKind | None, *, include_replayed: bool = True) -> Selection:
    return Selection(queue, kind.value if kind is not None else None, include_replayed)


QueueOpt = Annotated[
    str | None, typer.Option("--queue", "-q", help="Only dead letters of this queue or stream (e.g. email).")
]
KindOpt = Annotated[FailureKind | None, typer.Option("--kind", "-k", help="Only dead letters of this failure kind.")]
IdArg = Annotated[int, typer.Argument(metavar="ID", help="The dead letter's id (see `pipeline dlq list`).")]


# --- dead letters: commands -------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    queue: QueueOpt = None,
    kind: KindOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N dead letters.")] = 50,
) -> None:
    """List dead letters, newest first."""
    letters, total = _run(_list(_settings().database_url, _selection(queue, kind), limit))
    if not letters:
        typer.echo("no dead letters match", err=True)
        return
    typer.echo(_render(_letters_table(letters)))
    typer.echo(f"{len(letters)} of {_n(total, 'matching dead letter')}, newest first", err=True)


@dlq_app.command("show")
def dlq_show(dead_letter_id: IdArg) -> None:
    """Show everything kept about one dead letter: headers, stack trace and body."""
    letter = _letter(_settings(), dead_letter_id)
    try:
        lines = describe(letter)
    except deadletters.DeadLetterError as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    typer.echo("\n".join(lines))


@dlq_app.command("replay")
def dlq_replay(
    dead_letter_id: Annotated[
        int | None, typer.Argument(metavar="[ID]", help="The dead letter to replay (or --all).")
    ] = None,
    *,
    all_: Annotated[bool, typer.Option("--all", help="Replay every matching dead letter not replayed yet.")] = False,
    queue: QueueOpt = None,
    kind: KindOpt = None,
    include_replayed: Annotated[
        bool, typer.Option("--include-replayed", help="With --all: replay those replayed before, too.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be replayed; change nothing.")] = False,
    rate: Annotated[float | None, typer.Option("--rate", min=0.001, help="At most N messages per second.")] = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Put dead letters back on their queue or stream: same bytes and ids, attempt count reset."""
    if (dead_letter_id is None) == (not all_) or (dead_letter_id is not None and (queue or kind or include_replayed)):
        _fail("give one dead letter ID, or --all (with --queue, --kind, --include-replayed to narrow it)", EXIT_INVALID)
    settings = _settings()
    if dead_letter_id is not None:
        letters = [_letter(settings, dead_letter_id)]
    else:
        letters = _run(_to_replay(settings.database_url, _selection(queue, kind, include_replayed=include_replayed)))
    if not letters:
        typer.echo("nothing to replay: no dead letters match (replayed ones need --include-replayed)", err=True)
        return
    if dry_run:
        typer.echo("\n".join(f"would replay {_one_line(dl)}" for dl in letters))
        typer.echo(f"dry run: {_n(len(letters), 'dead letter')} would be replayed; nothing was changed", err=True)
        return
    done: list[str] = []
    try:
        _run(_replay(settings, letters, rate, timeout, done))
    finally:
        if done:
            typer.echo("\n".join(done))
    typer.echo(f"replayed {_n(len(done), 'dead letter')}", err=True)


@dlq_app.command("purge")
def dlq_purge(
    queue: QueueOpt = None,
    kind: KindOpt = None,
    *,
    broker_queues: Annotated[
        bool,
        typer.Option(
            "--broker-queues",
            help="Also empty the brokers' `<queue>.dlq` queues and streams of the matching queues (every kind).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Delete dead letters for good, after saying what would go and getting a yes."""
    settings = _settings()
    plan, sizes = _run(_plan_purge(settings, _selection(queue, kind), broker_queues, timeout))
    if not plan.total:
        typer.echo("nothing to purge: no dead letters match", err=True)
        return
    typer.echo("\n".join(_purge_description(plan, sizes, mask_url(settings.database_url))))
    if not yes and not _confirmed(f"Delete {'it' if plan.total == 1 else f'these {plan.total}'}?"):
        _fail("not confirmed: nothing was deleted", EXIT_UNAVAILABLE)
    deleted, purged = _run(_purge(settings, plan, broker_queues, timeout))
    for (transport, name), count in sorted(purged.items()):
        kind_of = "RabbitMQ queue" if transport == "rabbit" else "Redis stream"
        removed = "it does not exist" if count is None else f"{_n(count, 'message')} removed"
        typer.echo(f"emptied {kind_of} {name!r}: {removed}")
    typer.echo(f"deleted {_n(deleted, 'dead letter')} from the database")


if __name__ == "__main__":
    app()
