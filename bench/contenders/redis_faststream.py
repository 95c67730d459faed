"""(f) Bare FastStream Redis Streams subscriber: consumer group, `SendEmail` annotation validates, FastStream XACKs."""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream.redis import RedisBroker, StreamSub

from bench import loops
from bench.contenders.meter import Meter, arguments, write
from schemas import SendEmail


async def consume(url: str, stream: str, group: str, n: int, count: int, max_seconds: float) -> Meter:
    """Drain n entries with one (sequential) stream subscriber reading `count` entries at a time."""
    meter = Meter(n, max_seconds)
    done = asyncio.Event()
    broker = RedisBroker(url, logger=logging.getLogger("bench.faststream"), log_level=logging.DEBUG)

    @broker.subscriber(stream=StreamSub(stream, group=group, consumer="faststream-1", max_records=count))
    async def handle(cmd: SendEmail) -> None:
        if meter.tick():
            done.set()

    async with broker:
        await broker.start()
        await done.wait()
    return meter


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.redis_faststream --url ... --name STREAM --group G --n N --out FILE`."""
    logging.basicConfig(level=logging.WARNING)
    args = arguments(__doc__ or "").parse_args(argv)
    meter = loops.run(consume(args.url, args.name, args.group, args.n, args.count, args.max_seconds), args.loop)
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
