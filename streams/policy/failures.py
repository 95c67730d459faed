"""The failure policy, written once for both brokers: classify, decide, describe."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import UTC, datetime

from handlers.errors import FatalError, InvalidMessageError
from schemas import FailureKind
from streams.core import names
from streams.core.envelope import Envelope, storable

MAX_STACKTRACE_CHARS = 4_000
MAX_EXCEPTION_MESSAGE_CHARS = 1_000


def classify(exc: BaseException, *, decoded: bool) -> FailureKind | None:
    """The failure kind of an exception, or None when it is transient (worth a retry).

    `decoded` says whether the command had been decoded and validated when it was raised:
    anything raised before that is the message's fault, whatever its type.
    """
    if not decoded or isinstance(exc, InvalidMessageError):
        return FailureKind.INVALID
    if isinstance(exc, FatalError):
        return FailureKind.FATAL
    # Transient errors and anything unforeseen (a bug, a database hiccup) are retried, then
    # dead-lettered as exhausted: an unknown failure never loses a message.
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, described for headers, events and logs."""

    kind: FailureKind
    exception_type: str
    exception_message: str
    stacktrace: str
    attempts: int
    first_failure_at: datetime
    last_failure_at: datetime

    @classmethod
    def of(cls, exc: BaseException, kind: FailureKind, env: Envelope) -> Failure:
        """Describe an exception raised while handling `env`."""
        now = datetime.now(UTC)
        first = _parse_time(env.headers.get(names.H_FIRST_FAILURE_AT)) or now
        trace = "".join(traceback.format_exception(exc))
        return cls(
            kind=kind,
            exception_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            exception_message=storable(str(exc))[:MAX_EXCEPTION_MESSAGE_CHARS],
            stacktrace=storable(trace)[-MAX_STACKTRACE_CHARS:],
            attempts=env.attempt,
            first_failure_at=first,
            last_failure_at=now,
        )

    def headers(self, env: Envelope) -> dict[str, str]:
        """The dead-letter headers of DESIGN.md."""
        return {
            names.H_FAILURE_KIND: self.kind.value,
            names.H_EXCEPTION_TYPE: self.exception_type,
            names.H_EXCEPTION_MESSAGE: self.exception_message,
            names.H_EXCEPTION_STACKTRACE: self.stacktrace,
            names.H_ORIGINAL_QUEUE: env.source,
            names.H_ATTEMPTS: str(self.attempts),
            names.H_FIRST_FAILURE_AT: self.first_failure_at.isoformat(),
            names.H_LAST_FAILURE_AT: self.last_failure_at.isoformat(),
            names.H_MESSAGE_ID: env.message_id,
            names.H_CORRELATION_ID: env.correlation_id,
        }


def _parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
