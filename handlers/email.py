"""E-mail flow: `SendEmail` -> `EmailSent`."""

from __future__ import annotations

from handlers.ports import Mailer
from schemas import EmailSent, MessageContext, SendEmail


async def send_email(cmd: SendEmail, ctx: MessageContext, mailer: Mailer) -> EmailSent:
    """Send the mail once; the message id is the provider's idempotency key."""
    provider_id = await mailer.send(cmd, idempotency_key=ctx.message_id)
    return EmailSent(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        to=str(cmd.to),
        subject=cmd.subject,
        provider_id=provider_id,
    )
