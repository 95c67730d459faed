"""The one mapping from HTTP outcomes to the error tree, shared by every httpx adapter."""

from __future__ import annotations

import httpx

from handlers.errors import DeliveryRejectedError, DependencyUnavailableError

# 408 and 429 are the provider saying "later", not "never".
_RETRYABLE_4XX = frozenset({408, 425, 429})


async def post_json(client: httpx.AsyncClient, url: str, payload: object, headers: dict[str, str]) -> httpx.Response:
    """POST JSON; 2xx returns, 4xx raises DeliveryRejectedError, the rest DependencyUnavailableError."""
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
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        raise DeliveryRejectedError(detail)
    raise DependencyUnavailableError(detail)
