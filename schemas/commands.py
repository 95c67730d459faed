"""Commands: what producers ask the pipeline to do (imperative names)."""

from __future__ import annotations

from typing import Annotated, TypeAlias

from pydantic import EmailStr, Field

from schemas.base import Message

MAX_BODY_CHARS = 100_000
MAX_PROMPT_CHARS = 32_000


class SendEmail(Message):
    """Send one e-mail. Outcome: `email.sent`, or `email.failed` when it fails for good."""

    to: EmailStr = Field(description="Recipient address.", examples=["ada@example.com"])
    subject: Annotated[str, Field(min_length=1, max_length=998, pattern=r"^[^\r\n]*$")] = Field(
        description="Subject line: one line (no CR/LF, so no header injection), at most 998 characters (RFC 5322).",
        examples=["Welcome"],
    )
    body: Annotated[str, Field(max_length=MAX_BODY_CHARS)] = Field(
        description="Plain-text body.", examples=["Hello Ada, welcome aboard."]
    )
    template: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] | None = Field(
        None, description="Optional template name the mail provider renders.", examples=["welcome"]
    )


class RequestCompletion(Message):
    """Run one LLM completion. Outcome: `completion.succeeded`, or `completion.failed`."""

    task_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")] = Field(
        description="Caller's task id; the task's status is kept under it.",
        examples=["3f1c2a9e-7b1d-4c55-9d0e-5a4b8f0f2b61"],
    )
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] = Field(
        description="The user prompt.", examples=["Summarise this ticket in one line."]
    )
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")] = Field(
        description="Model name; `echo` is the built-in deterministic model.", examples=["echo"]
    )


Command: TypeAlias = SendEmail | RequestCompletion
