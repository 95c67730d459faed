"""A slow call does not hold up the quick ones beside it: a mail provider that takes 20 s to answer
one message, while the messages published after it on the same queue or stream are sent at once."""

from __future__ import annotations

import time
from typing import Any

from streams.core import names
from tests.connected.conftest import wait_until
from tests.connected.harness import Bus, Workers, email
from tests.httpserver import ScriptedResponse

SLOW_SECONDS = 20.0


async def test_a_slow_call_does_not_hold_up_the_messages_after_it(bus: Bus, workers: Workers, mail_server: Any) -> None:
    await workers.start(PIPELINE_MAILER_TIMEOUT="60")
    slow = "slow-" + str(time.time_ns())
    mail_server.script_for(slow, ScriptedResponse(200, {"id": "slow"}, delay=SLOW_SECONDS))
    started = time.monotonic()
    await bus.send(names.EMAIL_QUEUE, email("slow"), message_id=slow)

    async def calling() -> bool:
        return bool(mail_server.requests_for(slow))

    await wait_until(calling, 10)  # its call is under way
    quick = [await bus.send(names.EMAIL_QUEUE, email(f"quick {i}")) for i in range(10)]
    for mid in quick:  # each sent and answered while the slow call still waits
        await bus.event(names.EMAIL_SENT, mid, timeout=10)
    assert time.monotonic() - started < SLOW_SECONDS, "the quick ones waited for the slow one"
    sent = await bus.event(names.EMAIL_SENT, slow, timeout=SLOW_SECONDS + 20)
    assert sent["provider_id"] == "slow"
