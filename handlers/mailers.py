"""Mailer adapters: `log` (default, sends nothing) and `http` (POST to a provider)."""

from __future__ import annotations

import aiohttp
import structlog

from handlers.http import post_json
from schemas import SendEmail

# structlog's own logger: the app configures it (level, JSON lines, the message's ids bound).
log = structlog.get_logger()


class LogMailer:
    """Writes the mail to the log instead of sending it; for development."""

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str | None:
        log.info(
            "mail", logger="pipeline.mailer", to=str(mail.to), subject=mail.subject, idempotency_key=idempotency_key
        )
        return f"log-{idempotency_key}"


class HttpMailer:
    """POSTs `{to, subject, body, template}` with `Idempotency-Key: <message id>`."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None = None) -> None:
        self._session = session
        self._url = url
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(self, mail: SendEmail, *, idempotency_key: str) -> str | None:
        payload = {"to": str(mail.to), "subject": mail.subject, "body": mail.body, "template": mail.template}
        headers = {"Idempotency-Key": idempotency_key, **self._auth}
        answer = await post_json(self._session, self._url, payload, headers)
        try:
            data = answer.json()
        except ValueError:
            return None
        provider_id = data.get("id") if isinstance(data, dict) else None
        return str(provider_id) if provider_id is not None else None
