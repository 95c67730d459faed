"""The e-mail API: 200 `{"id": ...}` after a latency, 429 + Retry-After beyond a sliding-window limit."""

from __future__ import annotations

import json
from collections import deque

from tests.providers.base import Provider, RetryAfter
from tests.providers.http import Reply


class MailProvider(Provider):
    """An e-mail API: 200 `{"id": ...}` after `latency`; 429 + Retry-After beyond `limit` a `window`."""

    kind = "mail"

    def __init__(
        self,
        *,
        latency: float = 0.1,
        limit: int | None = None,
        window: float = 1.0,
        retry_after: RetryAfter = "1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(latency=latency, host=host, port=port)
        self.limit = limit
        self.window = window
        self.retry_after = retry_after
        self._window: deque[float] = deque()  # accepted requests' arrival times, within `window`

    @property
    def endpoint(self) -> str:
        """`<url>/send`: PIPELINE_MAILER_URL."""
        return self.url + "/send"

    def _reset_limits(self) -> None:
        self._window.clear()

    async def respond(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        now = self._arrived()
        try:
            mail = json.loads(body)
        except ValueError:
            mail = None
        if not isinstance(mail, dict) or "to" not in mail:
            self._error()
            return Reply(400, {"error": "expected a JSON object with `to`"})
        key = headers.get("idempotency-key")
        with self._cond:  # the window and the counters move together (reset() comes from other threads)
            if self.limit is not None:
                window = self._window
                while window and window[0] <= now - self.window:
                    window.popleft()
                if len(window) >= self.limit:
                    self._reject(now)
                    return Reply(429, {"error": "rate limited"}, self._retry_header(self.retry_after, lambda: "1"))
                window.append(now)
            self._admit(now, key)
            number = self._c.accepted
        await self._pause()
        return Reply(200, {"id": f"mail-{number}"})
