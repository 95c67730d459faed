"""Logging: one JSON line per call with the bound ids, level filtering, re-configuration, masked secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from streams.core.logging import bind_message, configure_logging, get_logger, unbind_message


class Stdout:
    """A stand-in for stdout (text over a byte buffer, like the real one) that logging gets configured on."""

    def __init__(self) -> None:
        self.stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)

    def configure(self, level: str = "INFO", fmt: str = "auto") -> None:
        """configure_logging while this is sys.stdout (pytest puts its own back around every test phase)."""
        real, sys.stdout = sys.stdout, self.stream
        try:
            configure_logging(level, fmt)
        finally:
            sys.stdout = real

    def lines(self) -> list[str]:
        """The lines written so far."""
        buffer = self.stream.buffer
        assert isinstance(buffer, io.BytesIO)
        return buffer.getvalue().decode().splitlines()

    def records(self) -> list[dict[str, Any]]:
        """Every line parsed as one JSON object."""
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def out() -> Iterator[Stdout]:
    """A fresh stdout; afterwards logging as the app configures it on pytest's, and no ids left bound."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield Stdout()
    finally:
        structlog.contextvars.clear_contextvars()
        configure_logging(os.environ.get("PIPELINE_LOG_LEVEL", "INFO"), os.environ.get("PIPELINE_LOG_FORMAT", "auto"))
        root.handlers[:] = handlers
        root.setLevel(level)


def test_each_call_writes_one_json_line_with_the_bound_ids_and_its_fields(out: Stdout) -> None:
    """At INFO, log.info writes one JSON line: event, level, logger, timestamp, the message's ids, the fields."""
    out.configure("INFO", "json")
    log = get_logger("pipeline.test")
    bind_message("m-1", "c-1", "emails.send")
    log.info("handled", event_type="EmailSent", attempt=1)
    log.info("handled", event_type="EmailSent", attempt=2)
    first, second = out.records()
    assert first == {
        "event": "handled",
        "level": "info",
        "logger": "pipeline.test",
        "timestamp": first["timestamp"],
        "message_id": "m-1",
        "correlation_id": "c-1",
        "queue": "emails.send",
        "event_type": "EmailSent",
        "attempt": 1,
    }
    assert first["timestamp"].endswith("Z")
    assert second["attempt"] == 2


def test_unbinding_the_message_drops_its_ids(out: Stdout) -> None:
    """After unbind_message, lines carry no message_id, correlation_id or queue."""
    out.configure("INFO", "json")
    log = get_logger("pipeline.test")
    bind_message("m-1", "c-1", "emails.send")
    unbind_message()
    log.info("idle")
    (line,) = out.records()
    assert not {"message_id", "correlation_id", "queue"} & line.keys()


@pytest.mark.parametrize(
    ("level", "written"),
    [
        ("DEBUG", ["debug", "info", "warning", "error"]),
        ("INFO", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("ERROR", ["error"]),
    ],
)
def test_lines_below_the_level_write_nothing(out: Stdout, level: str, written: list[str]) -> None:
    """Only calls at or above the configured level write a line; the others write nothing at all."""
    out.configure(level, "json")
    log = get_logger("pipeline.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["level"] for r in out.records()] == written


def test_a_logger_taken_before_the_last_configuration_writes_with_it(out: Stdout) -> None:
    """A module's logger, taken at import and used before start-up configures again, follows the new set-up.

    structlog caches a logger on first use; the level and the stream set by the later call win anyway.
    """
    log = get_logger("pipeline.taken-at-import")
    out.configure("WARNING", "json")
    log.warning("at import")
    log.info("below WARNING")

    later = Stdout()
    later.configure("INFO", "json")
    log.info("handled", attempt=1)
    log.debug("below INFO")
    later.configure("INFO", "json")  # a third call changes nothing more
    log.info("again")

    assert [r["event"] for r in out.records()] == ["at import"]
    assert [r["event"] for r in later.records()] == ["handled", "again"]


def test_a_higher_level_on_reconfiguration_silences_a_logger_already_used(out: Stdout) -> None:
    """Raising the level after a logger wrote takes effect for that logger at once."""
    out.configure("DEBUG", "json")
    log = get_logger("pipeline.test")
    log.debug("one")
    out.configure("ERROR", "json")
    log.warning("two")
    log.error("three")
    assert [r["event"] for r in out.records()] == ["one", "three"]


def test_stdlib_loggers_go_through_one_handler_after_configuring_twice(out: Stdout) -> None:
    """uvicorn's and FastStream's stdlib lines come out once each, as JSON, with their logger name and the ids."""
    faststream = logging.getLogger("faststream")
    faststream.addHandler(logging.StreamHandler(io.StringIO()))  # FastStream's own handler: replaced
    faststream.propagate = False
    out.configure("INFO", "json")
    out.configure("INFO", "json")
    bind_message("m-2", "c-2", "emails.send")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    faststream.warning("consumer restarted")
    logging.getLogger("pipeline.mailer").debug("below the level")
    uvicorn, fs = out.records()
    assert (uvicorn["logger"], uvicorn["event"], uvicorn["level"]) == (
        "uvicorn.error",
        "Started server process [42]",
        "info",
    )
    assert (fs["logger"], fs["event"], fs["message_id"]) == ("faststream", "consumer restarted", "m-2")
    assert faststream.handlers == []
    assert faststream.propagate


def test_secrets_are_masked_in_fields_urls_extras_and_tracebacks(out: Stdout) -> None:
    """Secret-named fields, URL passwords (nested too), stdlib extras and exception text never show a secret."""
    out.configure("INFO", "json")
    log = get_logger("pipeline.test")
    log.info(
        "starting",
        password="hunter2",
        api_key=12345,
        url="amqp://guest:hunter2@rabbit:5672/",
        settings={"redis_url": "redis://:hunter2@redis/0", "nested": [{"token": "hunter2"}]},
        mail="someone@example.com",
    )
    logging.getLogger("pipeline.mailer").info("mail sent", extra={"authorization": "Bearer hunter2"})
    try:
        raise ConnectionError("cannot reach postgresql://app:hunter2@db/app")
    except ConnectionError:
        log.exception("connection failed")
    text = "\n".join(out.lines())
    assert "hunter2" not in text
    starting, mailer, failed = out.records()
    assert starting["password"] == starting["api_key"] == "***"
    assert starting["url"] == "amqp://guest:***@rabbit:5672/"
    assert starting["settings"] == {"redis_url": "redis://:***@redis/0", "nested": [{"token": "***"}]}
    assert starting["mail"] == "someone@example.com"
    assert mailer["authorization"] == "***"
    assert failed["level"] == "error"
    assert "postgresql://app:***@db/app" in failed["exception"]


def test_values_json_cannot_hold_natively_still_make_a_line(out: Stdout) -> None:
    """Integer keys and arbitrary objects do not break a line: keys become strings, objects their repr."""
    out.configure("INFO", "json")

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    get_logger("pipeline.test").info("odd", counts={1: "one"}, thing=Opaque())
    (line,) = out.records()
    assert line["counts"] == {"1": "one"}
    assert line["thing"] == "<opaque>"


def test_console_format_is_for_humans(out: Stdout) -> None:
    """PIPELINE_LOG_FORMAT=console writes readable lines with the event and the ids, not JSON."""
    out.configure("INFO", "console")
    bind_message("m-3", "c-3", "emails.send")
    get_logger("pipeline.test").info("handled", attempt=1)
    logging.getLogger("uvicorn.error").info("from stdlib")
    ours, stdlib = out.lines()
    assert not ours.startswith("{")
    assert "handled" in ours
    assert "m-3" in ours
    assert "attempt" in ours
    assert "from stdlib" in stdlib


def test_auto_format_writes_json_off_a_terminal(out: Stdout) -> None:
    """The default format, off a TTY (a container, a pipe), is JSON lines."""
    out.configure()
    get_logger("pipeline.test").info("handled")
    (line,) = out.records()
    assert line["event"] == "handled"


def test_an_unknown_level_is_refused() -> None:
    """A level name that logging does not know raises ValueError."""
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging("LOUD", "json")


def test_get_logger_gives_one_logger_a_name() -> None:
    """The same name gives the same logger, another name another one."""
    assert get_logger("pipeline.a") is get_logger("pipeline.a")
    assert get_logger("pipeline.a") is not get_logger("pipeline.b")


def test_a_bound_logger_adds_its_values_to_every_line(out: Stdout) -> None:
    """get_logger(...).bind(k=v) writes k on each of its lines, with the logger's name."""
    out.configure("INFO", "json")
    log = get_logger("pipeline.test").bind(batch=7)
    log.info("one")
    log.debug("below the level")
    (line,) = out.records()
    assert (line["logger"], line["batch"], line["event"]) == ("pipeline.test", 7, "one")
