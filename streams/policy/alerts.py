"""Dead-letter alerts: a webhook POST when PIPELINE_ALERT_URL is set, a warning log line otherwise."""

from __future__ import annotations

import aiohttp

from streams.core.envelope import Envelope
from streams.core.logging import get_logger
from streams.policy.failures import Failure

log = get_logger("pipeline.alerts")
ALERT_TIMEOUT = 3.0


class Alerter:
    """Tells a human that a message was parked; never fails the caller."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def dead_lettered(self, env: Envelope, failure: Failure, dead_letter_id: int) -> None:
        """Send the alert for one dead letter."""
        payload = {
            "text": f"{env.transport}:{env.source} message {env.message_id} dead-lettered ({failure.kind.value})",
            "dead_letter_id": dead_letter_id,
            "transport": env.transport,
            "queue": env.source,
            "message_id": env.message_id,
            "correlation_id": env.correlation_id,
            "failure_kind": failure.kind.value,
            "exception_type": failure.exception_type,
            "exception_message": failure.exception_message,
            "attempts": failure.attempts,
        }
        if self.url is None:
            log.warning("dead letter needs review", alert=payload["text"], dead_letter_id=dead_letter_id)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ALERT_TIMEOUT), trust_env=True)
        try:
            async with self._session.post(self.url, json=payload, raise_for_status=True):
                pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("alert webhook failed", error=repr(exc), dead_letter_id=dead_letter_id)

    async def close(self) -> None:
        """Close the webhook session."""
        if self._session is not None:
            await self._session.close()
