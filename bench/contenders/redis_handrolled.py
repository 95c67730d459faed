"""(i) Hand-rolled FastStream + SQLAlchemy on Redis Streams: the pipeline's job one entry at a time.

A FastStream stream subscriber on its own stream (group `bench`, `max_records` as the bare (f),
sequential, XACK per entry); the handler's `cmd: SendEmail` annotation validates; per entry one
`AsyncSession` transaction on SQLite (inbox check, event row, outbox row), commit, the
`email.sent` outcome published through a FastStream publisher to stream
`bench.handrolled.events` (XADD), then the outbox row marked published in a second transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream import Context
from faststream.redis import RedisBroker, StreamSub

from bench import loops
from bench.contenders.handrolled import REDIS_STREAM, fresh_store
from bench.contenders.meter import Meter, arguments, write
from schemas import SendEmail


async def consume(url: str, stream: str, group: str, n: int, count: int, max_seconds: float, sqlite: str) -> Meter:
    """Drain n entries with one (sequential) stream subscriber reading `count` entries at a time."""
    meter = Meter(n, max_seconds)
    done = asyncio.Event()
    broker = RedisBroker(url, logger=logging.getLogger("bench.handrolled"), log_level=logging.DEBUG)
    outcomes = broker.publisher(stream=REDIS_STREAM)

    async with fresh_store(sqlite) as store:

        @broker.subscriber(stream=StreamSub(stream, group=group, consumer="handrolled-1", max_records=count))
        async def handle(
            cmd: SendEmail,
            message_id: str = Context("message.message_id"),
            correlation_id: str = Context("message.correlation_id"),
        ) -> None:
            await store.handle(
                message_id,
                correlation_id,
                cmd,
                lambda row, corr, headers: outcomes.publish(row.payload, correlation_id=corr, headers=headers),
            )
            if meter.tick():
                done.set()

        async with broker:
            await broker.start()
            await done.wait()
    return meter


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.redis_handrolled --url ... --name STREAM --group G --n N --out FILE`."""
    logging.basicConfig(level=logging.WARNING)
    args = arguments(__doc__ or "").parse_args(argv)
    meter = loops.run(
        consume(args.url, args.name, args.group, args.n, args.count, args.max_seconds, args.sqlite), args.loop
    )
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
