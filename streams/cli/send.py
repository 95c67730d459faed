"""`pipeline send email|completion`: validate a command, publish it as a producer should.

The command is validated with the same Pydantic models the workers use, then published to
RabbitMQ (exchange `tasks`) or Redis Streams: persistent, confirmed, with a message id (the
idempotency key) and a correlation id. The message id is the only thing written to stdout.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import aiormq
import typer
from faststream.rabbit import RabbitBroker
from faststream.redis import RedisBroker
from pydantic import ValidationError
from redis.exceptions import RedisError

from schemas import Command, RequestCompletion, SendEmail
from streams.cli.common import (
    DEFAULT_TIMEOUT,
    EXIT_INVALID,
    EXIT_UNAVAILABLE,
    TimeoutOpt,
    fail,
    load_settings,
    one_line,
    quiet_client_logs,
)
from streams.core import names
from streams.core.settings import Settings, mask_url

CONTENT_TYPE = "application/json"
_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII: fits AMQP shortstr and any header

C = TypeVar("C", SendEmail, RequestCompletion)

__all__ = ["DEFAULT_TIMEOUT", "ROUTES", "Broker", "PublishError", "Route", "app", "publish"]


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
    """Raised when the broker could not be reached or did not take the message; the text is shown as is."""


app = typer.Typer(
    help="Validate a command and publish it (prints the message id on stdout).",
    no_args_is_help=True,
)


# --- publishing ---------------------------------------------------------------------------------


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
        raise PublishError(f"cannot publish to RabbitMQ at {mask_url(url)}: {one_line(exc)}") from exc
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
        raise PublishError(f"cannot publish to Redis at {mask_url(url)}: {one_line(exc)}") from exc
    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return f"stream {route.stream!r} (entry {entry}) on {mask_url(url)}"


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
    with quiet_client_logs():
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


# --- input --------------------------------------------------------------------------------------


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


def _send(command: SendEmail | RequestCompletion, broker: Broker, mid: str, cid: str, timeout: float) -> None:
    settings = load_settings()
    size = len(command.model_dump_json().encode())
    if size > settings.max_body_bytes:
        fail(
            f"the command is {size} bytes, over PIPELINE_MAX_BODY_BYTES={settings.max_body_bytes}: "
            "the workers would dead-letter it",
            EXIT_INVALID,
        )
    try:
        where = publish(broker, command, message_id=mid, correlation_id=cid, settings=settings, timeout=timeout)
    except PublishError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
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


# --- commands -----------------------------------------------------------------------------------


@app.command("email")
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


@app.command("completion")
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
