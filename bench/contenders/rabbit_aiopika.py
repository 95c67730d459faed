"""(a) Seed-style raw aio-pika consumer: `queue.iterator()`, validate `SendEmail`, ack each message."""

from __future__ import annotations

import sys

import aio_pika
from pydantic import ValidationError

from bench import loops
from bench.contenders.meter import Meter, arguments, write
from schemas import SendEmail


async def consume(url: str, queue_name: str, n: int, prefetch: int, max_seconds: float) -> Meter:
    """Drain n messages from the queue, the way the seed code did."""
    meter = Meter(n, max_seconds)
    conn = await aio_pika.connect_robust(url)
    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        async with queue.iterator() as messages:
            async for message in messages:
                try:
                    SendEmail.model_validate_json(message.body)
                except ValidationError:
                    meter.invalid += 1
                await message.ack()
                if meter.tick():
                    break
    return meter


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.rabbit_aiopika --url ... --name QUEUE --n N --out FILE`."""
    args = arguments(__doc__ or "").parse_args(argv)
    meter = loops.run(consume(args.url, args.name, args.n, args.prefetch, args.max_seconds), args.loop)
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
