"""What a handler knows about the message it handles, without knowing any broker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MessageContext:
    """Ids and attempt of the command being handled."""

    message_id: str
    correlation_id: str
    attempt: int = 1
