"""The OpenAI-compatible model: deterministic usage, 429 + Retry-After beyond a tokens-per-minute window."""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any

from tests.providers.base import Provider, RetryAfter
from tests.providers.http import Reply


class ModelProvider(Provider):
    """An OpenAI-compatible `POST /v1/chat/completions`: deterministic usage, a tokens-per-minute limit."""

    kind = "model"

    def __init__(
        self,
        *,
        latency: float = 1.0,
        tokens_per_minute: int | None = None,
        completion_tokens: int = 50,
        retry_after: RetryAfter = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(latency=latency, host=host, port=port)
        self.tokens_per_minute = tokens_per_minute
        self.completion_tokens = completion_tokens
        self.retry_after = retry_after  # None: the seconds until the window has room for the request
        self._window: deque[tuple[float, int]] = deque()
        self._window_tokens = 0

    @property
    def endpoint(self) -> str:
        """`<url>/v1`: PIPELINE_LLM_URL."""
        return self.url + "/v1"

    def _reset_limits(self) -> None:
        self._window.clear()
        self._window_tokens = 0

    @staticmethod
    def prompt_tokens(messages: Any) -> int:
        """ceil(characters / 4) over the messages' text contents."""
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        return math.ceil(chars / 4)

    def _room_in(self, now: float, tokens: int) -> float:
        """Seconds until the 60 s window has room for `tokens` more."""
        assert self.tokens_per_minute is not None
        used = self._window_tokens
        for at, spent in self._window:
            used -= spent
            if used + tokens <= self.tokens_per_minute:
                return max(at + 60.0 - now, 0.0)
        return 60.0

    async def respond(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return Reply(404, {"error": {"message": f"no POST {path}", "type": "invalid_request_error"}})
        now = self._arrived()
        try:
            request = json.loads(body)
            messages = request["messages"]
            prompt = self.prompt_tokens(messages)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._error()
            return Reply(400, {"error": {"message": "expected {model, messages}", "type": "invalid_request_error"}})
        tokens = prompt + self.completion_tokens
        with self._cond:  # the window and the counters move together (reset() comes from other threads)
            if self.tokens_per_minute is not None:
                window = self._window
                while window and window[0][0] <= now - 60.0:
                    self._window_tokens -= window.popleft()[1]
                if self._window_tokens + tokens > self.tokens_per_minute:
                    self._reject(now)
                    wait = self._room_in(now, tokens)
                    retry = self._retry_header(self.retry_after, lambda: str(max(1, math.ceil(wait))))
                    error = {"message": "tokens per minute exceeded", "type": "tokens", "code": "rate_limit_exceeded"}
                    return Reply(429, {"error": error}, retry)
                window.append((now, tokens))
                self._window_tokens += tokens
                self._c.max_tokens_60s = max(self._c.max_tokens_60s, self._window_tokens)
            self._admit(now, headers.get("idempotency-key"), tokens)
            number = self._c.accepted
        await self._pause()
        usage = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens, "total_tokens": tokens}
        message = {"role": "assistant", "content": f"simulated completion of {self.completion_tokens} tokens"}
        return Reply(
            200,
            {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "model": request.get("model", "simulated") if isinstance(request, dict) else "simulated",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            },
        )
