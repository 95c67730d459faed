"""The side effects handlers need, as small Protocols; adapters live in mailers.py and models.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from schemas import SendEmail


@dataclass(frozen=True, slots=True)
class Completion:
    """What a model answered."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class Mailer(Protocol):
    """Sends one e-mail; returns the provider's id for it, if any."""

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str | None: ...


@runtime_checkable
class CompletionModel(Protocol):
    """Completes one prompt with the named model."""

    async def complete(self, prompt: str, *, model: str, idempotency_key: str) -> Completion: ...
