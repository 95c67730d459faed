"""structlog set-up: JSON lines off a TTY, console on one; message ids bound per message; secrets masked.

structlog's own fast path (its "performance" chapter): a filtering bound logger (a line below the
level is a no-op method, nothing else runs), loggers cached, orjson rendering bytes that go straight
to stdout's binary buffer. Stdlib loggers (uvicorn, FastStream, the mailer) go through a root handler
that renders the same lines.
"""

from __future__ import annotations

import functools
import logging
import logging.config
import re
import sys
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_SECRET_KEYS = ("password", "secret", "api_key", "token", "authorization")
_STDLIB_ROUTED = ("faststream", "faststream.access", "uvicorn", "uvicorn.error", "uvicorn.access")


def mask_secrets(text: str) -> str:
    """Replace the password of every URL in the text by `***`."""
    return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)


@functools.lru_cache(maxsize=1024)  # a line's keys come from a small set: decide each once
def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(s in lowered for s in _SECRET_KEYS)


def _clean(key: str, value: Any) -> Any:
    if value is not None and _secret_key(key):
        return "***"
    if isinstance(value, str):
        return mask_secrets(value) if "@" in value else value
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    return value


def _scrub(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in event.items():  # assigning to existing keys only: safe while iterating
        if value is None:
            continue
        if _secret_key(key):
            event[key] = "***"
        elif isinstance(value, str):
            if "@" in value:  # a URL password needs one: most values skip the regex
                event[key] = mask_secrets(value)
        elif isinstance(value, dict | list | tuple):
            event[key] = _clean(key, value)
    return event


def _dumps_text(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, **kw).decode()


class Logger:
    """A named logger that always writes with the latest `configure_logging`.

    structlog assembles a logger once and caches it (`cache_logger_on_first_use`), after which it
    never reads the configuration again; modules take their logger at import, before the app's
    start-up configures logging a second time. So `configure_logging` re-points each handle's
    methods at a logger built from the new configuration: a call is the structlog method itself.
    """

    __slots__ = ("critical", "debug", "error", "exception", "info", "name", "warning")

    debug: Callable[..., Any]
    info: Callable[..., Any]
    warning: Callable[..., Any]
    error: Callable[..., Any]
    exception: Callable[..., Any]
    critical: Callable[..., Any]

    def __init__(self, name: str) -> None:
        self.name = name
        _point(self)

    def bind(self, **values: Any) -> FilteringBoundLogger:
        """A structlog logger with these values on every line; it keeps the configuration in force now."""
        logger: FilteringBoundLogger = structlog.get_logger().bind(logger=self.name, **values)
        return logger


_loggers: dict[str, Logger] = {}


def _point(handle: Logger) -> None:
    """Point the handle's methods at a logger assembled now, from the configuration in force."""
    bound: FilteringBoundLogger = structlog.get_logger().bind(logger=handle.name)
    handle.debug = bound.debug
    handle.info = bound.info
    handle.warning = bound.warning
    handle.error = bound.error
    handle.exception = bound.exception
    handle.critical = bound.critical


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Route stdlib and structlog through one renderer; safe to call more than once."""
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    root = logging.getLogger()
    root.setLevel(level.upper())  # ValueError on an unknown level, before anything changes
    threshold = root.level

    text_renderer: Processor
    if json_lines:
        text_renderer = structlog.processors.JSONRenderer(serializer=_dumps_text, option=orjson.OPT_NON_STR_KEYS)
    else:
        text_renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    binary = getattr(sys.stdout, "buffer", None)
    logger_factory: Callable[..., WrappedLogger]
    renderer: Processor
    if json_lines and binary is not None:
        sys.stdout.flush()  # what the text layer holds goes out before bytes written under it
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps, option=orjson.OPT_NON_STR_KEYS)
        logger_factory = structlog.BytesLoggerFactory(binary)
    else:
        renderer = text_renderer
        logger_factory = structlog.WriteLoggerFactory(sys.stdout)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # before _scrub: a traceback's URL loses its password too
            _scrub,
            renderer,
        ],
        # Below the level, a method is a no-op: no processor runs, nothing is written.
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    for handle in _loggers.values():
        _point(handle)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _scrub,
    ]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                text_renderer,
            ],
        )
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"pipeline": {"()": lambda: handler}},
            "root": {"level": logging.getLevelName(threshold), "handlers": ["pipeline"]},
            # FastStream and uvicorn log through their own handlers; send them through ours instead.
            "loggers": {name: {"handlers": [], "propagate": True} for name in _STDLIB_ROUTED},
        }
    )


def get_logger(name: str) -> Logger:
    """A structlog logger; lines carry whatever ids the current message bound."""
    handle = _loggers.get(name)
    if handle is None:
        handle = _loggers[name] = Logger(name)
    return handle


def bind_message(message_id: str, correlation_id: str, source: str) -> None:
    """Bind the ids of the message being handled to every log line of this task."""
    structlog.contextvars.bind_contextvars(message_id=message_id, correlation_id=correlation_id, queue=source)


def unbind_message() -> None:
    """Forget the current message's ids."""
    structlog.contextvars.unbind_contextvars("message_id", "correlation_id", "queue")
