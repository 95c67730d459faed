"""(h) Hand-rolled FastStream + SQLAlchemy on RabbitMQ: the pipeline's job one message at a time.

A FastStream subscriber on its own quorum queue (`Channel(prefetch_count=64)`); the handler's
`cmd: SendEmail` annotation validates; per message one `AsyncSession` transaction on SQLite (inbox
check, event row, outbox row), commit, the `email.sent` outcome published through a FastStream
publisher (persistent, awaited until the broker confirms it: FastStream's default channel has
publisher confirms), then the outbox row marked published in a second transaction; FastStream acks.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream import Context
from faststream.rabbit import Channel, ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue

from bench import loops
from bench.contenders.handrolled import EMAIL_SENT, RABBIT_EXCHANGE, fresh_store
from bench.contenders.meter import Meter, arguments, write
from schemas import SendEmail


async def consume(url: str, queue_name: str, n: int, prefetch: int, max_seconds: float, sqlite: str) -> Meter:
    """Drain n messages with one subscriber, per-message logging at DEBUG as in the pipeline."""
    meter = Meter(n, max_seconds)
    done = asyncio.Event()
    broker = RabbitBroker(url, logger=logging.getLogger("bench.handrolled"), log_level=logging.DEBUG)
    queue = RabbitQueue(queue_name, queue_type=QueueType.QUORUM, durable=True, declare=False)
    exchange = RabbitExchange(RABBIT_EXCHANGE, type=ExchangeType.TOPIC, durable=True)
    outcomes = broker.publisher(exchange=exchange, routing_key=EMAIL_SENT, persist=True)

    async with fresh_store(sqlite) as store:

        @broker.subscriber(queue, channel=Channel(prefetch_count=prefetch))
        async def handle(
            cmd: SendEmail,
            message_id: str = Context("message.message_id"),
            correlation_id: str = Context("message.correlation_id"),
        ) -> None:
            await store.handle(
                message_id,
                correlation_id,
                cmd,
                lambda row, corr, headers: outcomes.publish(
                    row.payload, message_id=row.event_id, correlation_id=corr, headers=headers
                ),
            )
            if meter.tick():
                done.set()

        async with broker:
            await broker.start()
            await done.wait()
    return meter


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.rabbit_handrolled --url ... --name QUEUE --n N --out FILE`."""
    logging.basicConfig(level=logging.WARNING)
    args = arguments(__doc__ or "").parse_args(argv)
    meter = loops.run(consume(args.url, args.name, args.n, args.prefetch, args.max_seconds, args.sqlite), args.loop)
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
