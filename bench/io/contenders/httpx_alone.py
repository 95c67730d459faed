"""The HTTP client alone: N POSTs through one httpx.AsyncClient with the pipeline's pool limits, no broker.

What one process spends on the client side of the same calls: the ceiling of anything that sends them
with httpx on this event loop. `--concurrency` calls in flight (the worker's prefetch); the pool is
the pipeline's (`streams.flows.deps.HTTP_CONNECTIONS` and `HTTP_KEEPALIVE`). Waits for SIGTERM when done.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import httpx

from bench import loops, workload
from streams.flows.deps import HTTP_CONNECTIONS, HTTP_KEEPALIVE


async def send_all(url: str, n: int, concurrency: int, connections: int, keepalive: int) -> None:
    """Send n e-mails, `concurrency` at a time, then wait for SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=keepalive)
    ids = list(workload.message_ids("alone", n))
    next_index = 0
    async with httpx.AsyncClient(timeout=10.0, limits=limits, trust_env=False) as client:

        async def sender() -> None:
            nonlocal next_index
            while next_index < n and not stop.is_set():
                i = next_index
                next_index += 1
                payload = {**workload.email_payload(i), "template": None}
                response = await client.post(url, json=payload, headers={"Idempotency-Key": ids[i]})
                response.raise_for_status()

        print("ready", flush=True)
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.io.contenders.httpx_alone --mailer-url URL --n N [--concurrency C]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mailer-url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--connections", type=int, default=HTTP_CONNECTIONS)
    parser.add_argument("--keepalive", type=int, default=HTTP_KEEPALIVE)
    parser.add_argument("--loop", default="auto")
    args = parser.parse_args(argv)
    loops.run(send_all(args.mailer_url, args.n, args.concurrency, args.connections, args.keepalive), args.loop)


if __name__ == "__main__":
    main(sys.argv[1:])
