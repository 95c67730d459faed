"""The one mapping from HTTP outcomes to the error tree, shared by every HTTP adapter (aiohttp)."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from handlers.errors import DeliveryRejectedError, DependencyUnavailableError, ThrottledError

# 408 and 429 are the provider saying "later", not "never".
_RETRYABLE_4XX = frozenset({408, 425, 429})
# Answers that, with a Retry-After, mean "not so fast" rather than "broken".
_THROTTLING = frozenset({429, 503})
HTTP_CONNECTIONS = 128  # per worker, shared by the mailer and the model: one per delivery a queue prefetches
CONNECT_TIMEOUT = 5.0
# A Retry-After further out than this is read as this (a provider's typo must not park a message for days).
MAX_RETRY_AFTER = 3_600.0
DEFAULT_429_WAIT = 1.0


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (RFC 9110: delay-seconds or an HTTP date); None if unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def new_session(timeout: float, connections: int = HTTP_CONNECTIONS) -> aiohttp.ClientSession:
    """The adapters' pooled session (create it in the running loop): `timeout` seconds a call in all.

    Idle connections stay open for aiohttp's keep-alive timeout (15 s), so bursts reuse them. Proxy
    variables (HTTPS_PROXY, NO_PROXY...) are honoured when one is set as the session is made: aiohttp's
    `trust_env` reads the environment and ~/.netrc again for every request, which costs more than the
    rest of the call, so a worker without a proxy does not pay for it.
    """
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        connector=aiohttp.TCPConnector(limit=connections),
        trust_env=bool(urllib.request.getproxies()),
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """A 2xx answer, read whole while its connection was held."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return orjson.loads(self.body)


async def post_json(session: aiohttp.ClientSession, url: str, payload: object, headers: dict[str, str]) -> Answer:
    """POST JSON; 2xx returns, 429 (or 503 with Retry-After) raises ThrottledError, other 4xx
    DeliveryRejectedError, the rest (a malformed Retry-After too) DependencyUnavailableError."""
    try:
        async with session.post(
            url, data=orjson.dumps(payload), headers={"Content-Type": "application/json", **headers}
        ) as response:
            status = response.status
            body = await response.read()
            header = response.headers.get("Retry-After")
    except TimeoutError as exc:  # the session's timeouts (aiohttp's own timeout errors are TimeoutErrors too)
        raise DependencyUnavailableError(f"{url} timed out: {type(exc).__name__}") from exc
    except aiohttp.ClientError as exc:
        raise DependencyUnavailableError(f"{url} unreachable: {type(exc).__name__}: {exc}") from exc
    if 200 <= status < 300:
        return Answer(status, body)
    detail = f"{url} answered {status}: {body[:300].decode('utf-8', 'replace')}"
    if status in _THROTTLING:
        # A 429 without Retry-After is still "too many": wait a second. A 503 without it is an outage.
        wait = retry_after(header) if header is not None else (DEFAULT_429_WAIT if status == 429 else None)
        if wait is not None:
            raise ThrottledError(f"{detail} (Retry-After {wait:.3f} s)", wait)
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        raise DeliveryRejectedError(detail)
    raise DependencyUnavailableError(detail)
