"""`pipeline send ...`: input is validated before anything is published, ids and routes are right."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from schemas import Command, RequestCompletion, SendEmail
from streams.cli import app, send
from streams.core.settings import Settings, get_settings

runner = CliRunner()

MAIL = ["send", "email", "--to", "ada@example.com", "--subject", "Welcome", "--body", "Hello Ada."]
COMPLETION = ["send", "completion", "--prompt", "Summarise this."]


@dataclass
class Recorder:
    """Stands in for `send.publish`: records each call, optionally fails."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def __call__(
        self,
        broker: send.Broker,
        command: Command,
        *,
        message_id: str,
        correlation_id: str,
        settings: Settings,
        timeout: float = send.DEFAULT_TIMEOUT,
    ) -> str:
        self.calls.append(
            {
                "broker": broker,
                "command": command,
                "message_id": message_id,
                "correlation_id": correlation_id,
                "settings": settings,
                "timeout": timeout,
            }
        )
        if self.error is not None:
            raise send.PublishError(self.error)
        return "the test double"


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Known settings for every test: no `.env`, no PIPELINE_* from the caller's shell."""
    monkeypatch.chdir(tmp_path)
    for key in ("PIPELINE_RABBIT_URL", "PIPELINE_REDIS_URL", "PIPELINE_MAX_BODY_BYTES"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(send, "publish", rec)
    return rec


def invoke(args: list[str], stdin: str | None = None) -> Result:
    return runner.invoke(app, args, input=stdin)


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4
    except ValueError:
        return False


# --- help ---------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    top = invoke(["--help"])
    send = invoke(["send", "--help"])
    email = invoke(["send", "email", "--help"])

    assert top.exit_code == 0
    assert "send" in top.stdout
    assert send.exit_code == 0
    assert "email" in send.stdout
    assert "completion" in send.stdout
    assert email.exit_code == 0
    for option in ("--to", "--subject", "--body", "--template", "--broker", "--message-id", "--correlation-id"):
        assert option in email.stdout


def test_no_arguments_shows_help() -> None:
    result = invoke([])
    assert "send" in result.stdout + result.stderr


# --- invalid input: exit 2, the field named, nothing published -----------------------------------


@pytest.mark.parametrize(
    ("args", "option", "field_name"),
    [
        (["send", "email", "--to", "not-an-address", "--subject", "Hi", "--body", "x"], "--to", "'to'"),
        (["send", "email", "--to", "ada@example.com", "--subject", "", "--body", "x"], "--subject", "'subject'"),
        (
            ["send", "email", "--to", "ada@example.com", "--subject", "a\r\nBcc: eve@x.io", "--body", "x"],
            "--subject",
            "'subject'",
        ),
        ([*MAIL, "--template", "Bad Template!"], "--template", "'template'"),
        ([*COMPLETION, "--model", "bad model!"], "--model", "'model'"),
        (["send", "completion", "--prompt", ""], "--prompt", "'prompt'"),
        ([*COMPLETION, "--task-id", "has spaces"], "--task-id", "'task_id'"),
    ],
)
def test_invalid_command_exits_2_naming_the_field(
    recorder: Recorder, args: list[str], option: str, field_name: str
) -> None:
    result = invoke(args)

    assert result.exit_code == 2, result.output
    assert f"invalid {option} (field {field_name}" in result.stderr
    assert result.stdout == ""
    assert recorder.calls == []


def test_invalid_email_says_why(recorder: Recorder) -> None:
    result = invoke(["send", "email", "--to", "not-an-address", "--subject", "Hi", "--body", "x"])

    assert result.exit_code == 2
    assert "not a valid email address" in result.stderr
    assert "nothing was published" in result.stderr
    assert recorder.calls == []


def test_every_problem_is_reported_at_once(recorder: Recorder) -> None:
    result = invoke(["send", "email", "--to", "nope", "--subject", "", "--body", "x", "--message-id", "a b"])

    assert result.exit_code == 2
    for option in ("--to", "--subject", "--message-id"):
        assert f"invalid {option}" in result.stderr
    assert recorder.calls == []


@pytest.mark.parametrize("bad_id", ["", "has space", "x" * 256, "naïve"])
@pytest.mark.parametrize("option", ["--message-id", "--correlation-id"])
def test_invalid_ids_exit_2(recorder: Recorder, option: str, bad_id: str) -> None:
    result = invoke([*MAIL, option, bad_id])

    assert result.exit_code == 2
    assert f"invalid {option}" in result.stderr
    assert recorder.calls == []


@pytest.mark.parametrize(
    "args",
    [
        ["send", "email", "--to", "ada@example.com", "--subject", "Hi"],  # --body missing
        [*MAIL, "--broker", "kafka"],
        [*MAIL, "--timeout", "0"],
        ["send", "fax"],
    ],
)
def test_usage_errors_exit_2(recorder: Recorder, args: list[str]) -> None:
    result = invoke(args)

    assert result.exit_code == 2
    assert recorder.calls == []


def test_command_over_the_body_limit_is_refused(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_MAX_BODY_BYTES", "64")
    result = invoke(["send", "email", "--to", "ada@example.com", "--subject", "Hi", "--body", "x" * 100])

    assert result.exit_code == 2
    assert "PIPELINE_MAX_BODY_BYTES=64" in result.stderr
    assert recorder.calls == []


def test_invalid_settings_exit_2_without_publishing(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_RABBIT_URL", "http://guest:hunter2@localhost/")
    result = invoke(MAIL)

    assert result.exit_code == 2
    assert "PIPELINE_RABBIT_URL" in result.stderr
    assert "hunter2" not in result.output
    assert recorder.calls == []


# --- valid input: the right command, broker and ids reach the publisher ------------------------------


def test_email_defaults_rabbit_and_fresh_ids(recorder: Recorder) -> None:
    result = invoke(MAIL)

    assert result.exit_code == 0, result.output
    [call] = recorder.calls
    assert call["broker"] is send.Broker.rabbit
    assert call["command"] == SendEmail(to="ada@example.com", subject="Welcome", body="Hello Ada.")
    assert is_uuid4(call["message_id"])
    assert call["correlation_id"] == call["message_id"]
    assert call["timeout"] == send.DEFAULT_TIMEOUT
    # stdout is the message id and nothing else, so `$(pipeline send ...)` captures it.
    assert result.stdout == call["message_id"] + "\n"
    assert "hint:" in result.stderr
    assert "email.sent" in result.stderr


def test_email_to_redis_with_given_ids(recorder: Recorder) -> None:
    result = invoke(
        [
            *MAIL,
            "--template",
            "welcome",
            "--broker",
            "redis",
            "--message-id",
            "order-42-welcome",
            "--correlation-id",
            "signup-7",
        ]
    )

    assert result.exit_code == 0, result.output
    [call] = recorder.calls
    assert call["broker"] is send.Broker.redis
    assert call["command"] == SendEmail(to="ada@example.com", subject="Welcome", body="Hello Ada.", template="welcome")
    assert call["message_id"] == "order-42-welcome"
    assert call["correlation_id"] == "signup-7"
    assert result.stdout.splitlines()[0] == "order-42-welcome"


def test_each_send_gets_its_own_message_id(recorder: Recorder) -> None:
    first, second = invoke(MAIL), invoke(MAIL)

    assert first.exit_code == second.exit_code == 0
    assert first.stdout != second.stdout
    assert len(recorder.calls) == 2


def test_completion_defaults(recorder: Recorder) -> None:
    result = invoke(COMPLETION)

    assert result.exit_code == 0, result.output
    [call] = recorder.calls
    command = call["command"]
    assert isinstance(command, RequestCompletion)
    assert command.model == "echo"
    assert command.prompt == "Summarise this."
    assert is_uuid4(command.task_id)
    assert command.task_id != call["message_id"]
    assert call["broker"] is send.Broker.rabbit
    assert result.stdout == call["message_id"] + "\n"
    assert f"task id {command.task_id}" in result.stderr


def test_completion_with_everything_given(recorder: Recorder) -> None:
    result = invoke(
        [*COMPLETION, "--model", "gpt-4o-mini", "--task-id", "task-9", "-b", "redis", "--message-id", "m-9"]
    )

    assert result.exit_code == 0, result.output
    [call] = recorder.calls
    assert call["command"] == RequestCompletion(task_id="task-9", prompt="Summarise this.", model="gpt-4o-mini")
    assert call["broker"] is send.Broker.redis
    assert (call["message_id"], call["correlation_id"]) == ("m-9", "m-9")


def test_dash_reads_the_text_from_stdin(recorder: Recorder) -> None:
    result = invoke(["send", "email", "--to", "ada@example.com", "--subject", "Hi", "--body", "-"], "line 1\nline 2\n")

    assert result.exit_code == 0, result.output
    assert recorder.calls[0]["command"].body == "line 1\nline 2\n"


def test_settings_reach_the_publisher(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_REDIS_URL", "redis://other-host:6380/2")
    result = invoke([*MAIL, "-b", "redis", "--timeout", "2.5"])

    assert result.exit_code == 0, result.output
    assert recorder.calls[0]["settings"].redis_url == "redis://other-host:6380/2"
    assert recorder.calls[0]["timeout"] == 2.5


# --- publish failures: exit 1, one line, no traceback, no password -----------------------------------


def test_publish_error_exits_1_with_one_line(recorder: Recorder) -> None:
    recorder.error = "cannot publish to RabbitMQ at amqp://guest:***@nowhere:5672/: refused"
    result = invoke(MAIL)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {recorder.error}"]


@pytest.mark.parametrize(
    ("broker", "env", "url"),
    [
        ("rabbit", "PIPELINE_RABBIT_URL", "amqp://guest:hunter2@127.0.0.1:1/"),
        ("redis", "PIPELINE_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0"),
    ],
)
def test_unreachable_broker_exits_1_without_traceback_or_password(
    monkeypatch: pytest.MonkeyPatch, broker: str, env: str, url: str
) -> None:
    monkeypatch.setenv(env, url)  # nothing listens on port 1: connection refused at once
    result = invoke([*MAIL, "--broker", broker, "--timeout", "3"])

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot publish to ")
    assert "127.0.0.1:1" in line
    assert "***" in line
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


# --- publish(): the route of each command -------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "command", "routing_key", "stream"),
    [
        (send.Broker.rabbit, SendEmail(to="a@example.com", subject="s", body="b"), "email", "email"),
        (send.Broker.redis, SendEmail(to="a@example.com", subject="s", body="b"), "email", "email"),
        (
            send.Broker.rabbit,
            RequestCompletion(task_id="t", prompt="p", model="echo"),
            "ai.completion",
            "ai.completion",
        ),
        (
            send.Broker.redis,
            RequestCompletion(task_id="t", prompt="p", model="echo"),
            "ai.completion",
            "ai.completion",
        ),
    ],
)
def test_publish_routes_each_command(
    monkeypatch: pytest.MonkeyPatch, broker: send.Broker, command: Command, routing_key: str, stream: str
) -> None:
    seen: list[tuple[str, str, send.Route, dict[str, Any], dict[str, Any]]] = []

    def fake(name: str) -> Any:
        async def publisher(url: str, route: send.Route, payload: dict[str, Any], **kwargs: Any) -> str:
            seen.append((name, url, route, payload, kwargs))
            return "somewhere"

        return publisher

    monkeypatch.setattr(send, "_publish_rabbit", fake("rabbit"))
    monkeypatch.setattr(send, "_publish_redis", fake("redis"))
    settings = Settings(rabbit_url="amqp://u:p@rabbit:5672/", redis_url="redis://redis:6379/1")

    where = send.publish(broker, command, message_id="m", correlation_id="c", settings=settings, timeout=4)

    assert where == "somewhere"
    [(name, url, route, payload, kwargs)] = seen
    assert name == broker.value
    assert url == (settings.rabbit_url if broker is send.Broker.rabbit else settings.redis_url)
    assert (route.routing_key, route.stream) == (routing_key, stream)
    assert payload == command.model_dump(mode="json")
    assert kwargs == {"message_id": "m", "correlation_id": "c", "io_timeout": 4}
