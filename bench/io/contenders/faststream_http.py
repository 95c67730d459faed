"""A bare FastStream RabbitMQ subscriber that sends each e-mail with aiohttp, as a team would write it.

The handler's `cmd: SendEmail` annotation validates; one POST of `{to, subject, body, template}` with
`Idempotency-Key: <message id>`; a non-2xx raises (FastStream rejects the message: no retries here,
this contender runs only against a provider without limit). Runs until SIGTERM; the provider counts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import aiohttp
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitMessage, RabbitQueue

from bench import loops
from schemas import SendEmail


async def serve(url: str, queue_name: str, mailer_url: str, prefetch: int) -> None:
    """Consume until SIGTERM, one POST per message, at most `prefetch` in flight."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=prefetch)) as session:
        broker = RabbitBroker(url, logger=logging.getLogger("bench.io.faststream"), log_level=logging.DEBUG)
        queue = RabbitQueue(queue_name, queue_type=QueueType.QUORUM, durable=True, declare=False)

        @broker.subscriber(queue, channel=Channel(prefetch_count=prefetch))
        async def handle(cmd: SendEmail, msg: RabbitMessage) -> None:
            payload = {"to": str(cmd.to), "subject": cmd.subject, "body": cmd.body, "template": cmd.template}
            headers = {"Idempotency-Key": msg.message_id}
            async with session.post(mailer_url, json=payload, headers=headers, raise_for_status=True) as response:
                await response.read()

        async with broker:
            await broker.start()
            print("ready", flush=True)
            await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.io.contenders.faststream_http --url AMQP --queue Q --mailer-url URL --prefetch N`."""
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--mailer-url", required=True)
    parser.add_argument("--prefetch", type=int, default=128)
    parser.add_argument("--loop", default="auto")
    args = parser.parse_args(argv)
    loops.run(serve(args.url, args.queue, args.mailer_url, args.prefetch), args.loop)


if __name__ == "__main__":
    main(sys.argv[1:])
