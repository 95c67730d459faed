"""The one mapping from HTTP outcomes to the error tree, shared by every httpx adapter."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from handlers.errors import DeliveryRejectedError, DependencyUnavailableError, ThrottledError

# 408 and 429 are the provider saying "later", not "never".
_RETRYABLE_4XX = frozenset({408, 425, 429})
# Answers that, with a Retry-After, mean "not so fast" rather than "broken".
_THROTTLING = frozenset({429, 503})
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


async def post_json(client: httpx.AsyncClient, url: str, payload: object, headers: dict[str, str]) -> httpx.Response:
    """POST JSON; 2xx returns, 429 (or 503 with Retry-After) raises ThrottledError, other 4xx
    DeliveryRejectedError, the rest (a malformed Retry-After too) DependencyUnavailableError."""
    try:
        response = await client.post(url, json=payload, headers=headers)
    except httpx.TimeoutException as exc:
        raise DependencyUnavailableError(f"{url} timed out: {type(exc).__name__}") from exc
    except httpx.TransportError as exc:
        raise DependencyUnavailableError(f"{url} unreachable: {type(exc).__name__}: {exc}") from exc
    status = response.status_code
    if 200 <= status < 300:
        return response
    detail = f"{url} answered {status}: {response.text[:300]}"
    if status in _THROTTLING:
        header = response.headers.get("retry-after")
        # A 429 without Retry-After is still "too many": wait a second. A 503 without it is an outage.
        wait = retry_after(header) if header is not None else (DEFAULT_429_WAIT if status == 429 else None)
        if wait is not None:
            raise ThrottledError(f"{detail} (Retry-After {wait:.3f} s)", wait)
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        raise DeliveryRejectedError(detail)
    raise DependencyUnavailableError(detail)
