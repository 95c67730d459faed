"""What the broker and this machine cost alone: an echo consumer doing none of the pipeline's work.

It reads the pipeline's quorum queue `email` (prefetch as the pipeline's) and talks to the
broker with aiormq's public API as a batching worker does: what arrived together is one batch,
whose `email.sent` outcomes (each carrying its command's message id) go out on `events` with
`basic_publish`, their confirms awaited together, and which is then acknowledged with one
`basic.ack(multiple=True)`; the next batch is what arrived meanwhile.
No validation, store or outbox. Timed by the same harness at the same rate as the pipeline, its
latency is what the broker and this machine cost by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.common import FieldTable

from bench import loops

QUEUE = "email"
EVENTS = "events"
EMAIL_SENT = "email.sent"


async def _publish_outcome(channel: aiormq.Channel, command: DeliveredMessage) -> None:
    headers: FieldTable = {"message-id": command.header.properties.message_id or ""}
    properties = spec.Basic.Properties(headers=headers, delivery_mode=2)
    await channel.basic_publish(b"{}", exchange=EVENTS, routing_key=EMAIL_SENT, properties=properties)


async def serve(url: str, prefetch: int) -> None:
    """Echo until cancelled; print `ready` once consuming."""
    connection = await aiormq.connect(url)
    try:
        receive = await connection.channel()
        await receive.basic_qos(prefetch_count=prefetch)
        send = cast(aiormq.Channel, await connection.channel(publisher_confirms=True))

        pending: list[DeliveredMessage] = []
        flushing: list[asyncio.Task[None]] = []

        async def flush() -> None:
            try:
                while pending:
                    batch = pending[:]
                    del pending[:]
                    await asyncio.gather(*(_publish_outcome(send, m) for m in batch))
                    assert batch[-1].delivery_tag is not None
                    await receive.basic_ack(batch[-1].delivery_tag, multiple=True)
            finally:
                flushing.clear()

        async def echo(message: DeliveredMessage) -> None:
            pending.append(message)
            if not flushing:
                flushing.append(asyncio.ensure_future(flush()))

        await receive.basic_consume(QUEUE, echo)
        print("ready", flush=True)
        await asyncio.Event().wait()
    finally:
        await connection.close()


def main() -> None:
    """`python -m bench.contenders.rabbit_echo --url ... --prefetch 128 --loop uvloop`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefetch", type=int, default=128)
    parser.add_argument("--loop", default="auto")
    args = parser.parse_args()
    loops.run(serve(args.url, args.prefetch), args.loop)


if __name__ == "__main__":
    main()
