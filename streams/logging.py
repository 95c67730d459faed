"""structlog set-up: JSON lines off a TTY, console on one; message ids bound per message; secrets masked."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_SECRET_KEYS = ("password", "secret", "api_key", "token", "authorization")


def mask_secrets(text: str) -> str:
    """Replace the password of every URL in the text by `***`."""
    return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)


def _clean(key: str, value: Any) -> Any:
    if any(s in key.lower() for s in _SECRET_KEYS) and value is not None:
        return "***"
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    return value


def _scrub(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in list(event.items()):
        event[key] = _clean(key, value)
    return event


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Route stdlib and structlog through one renderer; safe to call more than once."""
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _scrub,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        # A line below the level is dropped first, before the processors (not by the handler after them).
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # FastStream and uvicorn log through their own handlers; send them through ours instead.
    for name in ("faststream", "faststream.access", "uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger; lines carry whatever ids the current message bound."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


def bind_message(message_id: str, correlation_id: str, source: str) -> None:
    """Bind the ids of the message being handled to every log line of this task."""
    structlog.contextvars.bind_contextvars(message_id=message_id, correlation_id=correlation_id, queue=source)


def unbind_message() -> None:
    """Forget the current message's ids."""
    structlog.contextvars.unbind_contextvars("message_id", "correlation_id", "queue")
