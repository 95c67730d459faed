"""The broker's own latency floor: an echo consumer doing none of the pipeline's work.

It reads the pipeline's quorum queue `email` (prefetch as the pipeline's), publishes for each
command an `email.sent` on `events` carrying the command's message id, waits for the broker's
confirm, and acknowledges the command: the two broker hops of the pipeline's path, with no
validation, store or outbox. Timed by the same harness at the same rate as the pipeline, its
latency is what the broker and this machine cost by themselves.
"""

from __future__ import annotations

import argparse
import asyncio

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from bench import loops

QUEUE = "email"
EVENTS = "events"
EMAIL_SENT = "email.sent"


async def serve(url: str, prefetch: int) -> None:
    """Echo until cancelled; print `ready` once consuming."""
    connection = await aiormq.connect(url)
    try:
        receive = await connection.channel()
        await receive.basic_qos(prefetch_count=prefetch)
        send = await connection.channel(publisher_confirms=True)

        async def echo(message: DeliveredMessage) -> None:
            properties = spec.Basic.Properties(
                headers={"message-id": message.header.properties.message_id or ""}, delivery_mode=2
            )
            await send.basic_publish(b"{}", exchange=EVENTS, routing_key=EMAIL_SENT, properties=properties)
            assert message.delivery_tag is not None
            await receive.basic_ack(message.delivery_tag)

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
