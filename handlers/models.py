"""Completion model adapters: `echo` (default, deterministic) and `openai` (any compatible API)."""

from __future__ import annotations

from typing import Any

import aiohttp

from handlers.errors import DependencyUnavailableError
from handlers.http import post_json
from handlers.ports import Completion


class EchoModel:
    """Answers with the prompt itself: deterministic, free, offline."""

    async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Completion:
        words = len(prompt.split())
        return Completion(text=f"echo: {prompt}", prompt_tokens=words, completion_tokens=words + 1)


class OpenAIModel:
    """POSTs to `<base url>/chat/completions` of an OpenAI-compatible API."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None = None) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Completion:
        payload = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        headers = {"Idempotency-Key": idempotency_key, **self._auth}
        answer = await post_json(self._session, self._url, payload, headers)
        try:
            data = answer.json()
            text = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
            prompt_tokens = _token_count(usage, "prompt_tokens")
            completion_tokens = _token_count(usage, "completion_tokens")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as exc:
            # A 2xx we cannot read is the provider misbehaving, which tends to pass.
            raise DependencyUnavailableError(f"unreadable completion from {self._url}: {exc!r}") from exc
        if not isinstance(text, str):
            raise DependencyUnavailableError(f"completion content from {self._url} is not text")
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def _token_count(usage: Any, key: str) -> int:
    """A usage counter: absent or null is 0; anything but a non-negative integer raises ValueError."""
    value = usage.get(key)
    if value is None:
        return 0
    count = int(value)
    if count < 0:
        raise ValueError(f"negative {key}: {value!r}")
    return count
