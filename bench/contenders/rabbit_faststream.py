"""(b) Bare FastStream RabbitMQ subscriber: the handler's `SendEmail` annotation validates, FastStream acks."""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

from bench import loops
from bench.contenders.meter import Meter, arguments, write
from schemas import SendEmail


async def consume(url: str, queue_name: str, n: int, prefetch: int, max_seconds: float) -> Meter:
    """Drain n messages with one subscriber, per-message logging at DEBUG as in the pipeline."""
    meter = Meter(n, max_seconds)
    done = asyncio.Event()
    broker = RabbitBroker(url, logger=logging.getLogger("bench.faststream"), log_level=logging.DEBUG)
    queue = RabbitQueue(queue_name, queue_type=QueueType.QUORUM, durable=True, declare=False)

    @broker.subscriber(queue, channel=Channel(prefetch_count=prefetch))
    async def handle(cmd: SendEmail) -> None:
        if meter.tick():
            done.set()

    async with broker:
        await broker.start()
        await done.wait()
    return meter


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.rabbit_faststream --url ... --name QUEUE --n N --out FILE`."""
    logging.basicConfig(level=logging.WARNING)
    args = arguments(__doc__ or "").parse_args(argv)
    meter = loops.run(consume(args.url, args.name, args.n, args.prefetch, args.max_seconds), args.loop)
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
