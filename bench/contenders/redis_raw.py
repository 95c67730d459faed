"""(e) Raw redis-py consumer-group loop: XREADGROUP COUNT n, decode the envelope, validate, one XACK per batch."""

from __future__ import annotations

import sys

import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from pydantic import ValidationError

from bench import loops
from bench.contenders.meter import Meter, arguments, write
from bench.model import StreamReply
from schemas import SendEmail

DATA = b"__data__"


async def consume(url: str, stream: str, group: str, n: int, count: int, max_seconds: float) -> Meter:
    """Drain n entries of the stream through the consumer group."""
    meter = Meter(n, max_seconds)
    client = aioredis.from_url(url)
    finished = False
    try:
        while not finished:
            reply: StreamReply = await client.xreadgroup(group, "raw-1", {stream: ">"}, count=count, block=100)  # type: ignore[assignment]
            for _name, entries in reply or []:
                ids = []
                for entry_id, fields in entries:
                    body, _headers = BinaryMessageFormatV1.parse(fields[DATA])
                    try:
                        SendEmail.model_validate_json(body)
                    except ValidationError:
                        meter.invalid += 1
                    ids.append(entry_id)
                    finished = meter.tick() or finished
                if ids:
                    await client.xack(stream, group, *ids)
    finally:
        await client.aclose()
    return meter


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.redis_raw --url ... --name STREAM --group G --n N --out FILE`."""
    args = arguments(__doc__ or "").parse_args(argv)
    meter = loops.run(consume(args.url, args.name, args.group, args.n, args.count, args.max_seconds), args.loop)
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
