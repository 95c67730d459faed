"""The worker's HTTP client alone: N e-mails through the adapters' session and `post_json`, no broker.

What one process spends on the client side of the same calls: the ceiling of anything that sends them
with this client on this event loop. `--concurrency` calls in flight (the worker's prefetch); the
session is the worker's own (`handlers.http.new_session`). Waits for SIGTERM when done.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bench import loops, workload
from handlers.http import new_session, post_json


async def send_all(url: str, n: int, concurrency: int) -> None:
    """Send n e-mails, `concurrency` at a time, then wait for SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ids = list(workload.message_ids("alone", n))
    next_index = 0
    async with new_session(10.0) as session:

        async def sender() -> None:
            nonlocal next_index
            while next_index < n and not stop.is_set():
                i = next_index
                next_index += 1
                payload = {**workload.email_payload(i), "template": None}
                await post_json(session, url, payload, {"Idempotency-Key": ids[i]})

        print("ready", flush=True)
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.io.contenders.client_alone --mailer-url URL --n N [--concurrency C]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mailer-url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--loop", default="auto")
    args = parser.parse_args(argv)
    loops.run(send_all(args.mailer_url, args.n, args.concurrency), args.loop)


if __name__ == "__main__":
    main(sys.argv[1:])
