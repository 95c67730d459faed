"""`python -m tests.providers mail|model ...`: one provider in this process; prints its URL, serves until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tests.providers import __doc__ as DOC
from tests.providers.base import Provider, RetryAfter, http_date, new_loop
from tests.providers.mail import MailProvider
from tests.providers.model import ModelProvider


def _retry_after_option(raw: str) -> RetryAfter:
    """`date+N`: an HTTP date N seconds ahead at each answer; `auto`: computed (model); else verbatim."""
    if raw.startswith("date+"):
        seconds = float(raw.removeprefix("date+"))
        return lambda: http_date(seconds)
    return None if raw == "auto" else raw


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.providers mail|model [--port P] [--latency S] [--limit N | --tpm N] ...`."""
    parser = argparse.ArgumentParser(prog="python -m tests.providers", description=(DOC or "").split("\n\n")[0])
    parser.add_argument("kind", choices=("mail", "model"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=None, help="seconds (mail 0.1, model 1.0)")
    parser.add_argument("--limit", type=int, default=None, help="mail: accepted requests per window")
    parser.add_argument("--window", type=float, default=1.0, help="mail: the limit's window in seconds")
    parser.add_argument("--tpm", type=int, default=None, help="model: tokens per minute")
    parser.add_argument("--completion-tokens", type=int, default=50)
    parser.add_argument("--retry-after", default=None, help="verbatim, `date+N` or `auto` (model's default)")
    args = parser.parse_args(argv)
    provider: Provider
    if args.kind == "mail":
        retry = _retry_after_option(args.retry_after) if args.retry_after is not None else "1"
        latency = 0.1 if args.latency is None else args.latency
        provider = MailProvider(
            latency=latency, limit=args.limit, window=args.window, retry_after=retry, host=args.host, port=args.port
        )
    else:
        retry = _retry_after_option(args.retry_after) if args.retry_after is not None else None
        provider = ModelProvider(
            latency=1.0 if args.latency is None else args.latency,
            tokens_per_minute=args.tpm,
            completion_tokens=args.completion_tokens,
            retry_after=retry,
            host=args.host,
            port=args.port,
        )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await provider.serve()
        print(provider.url, flush=True)
        await stop.wait()
        await provider.aclose()

    loop = new_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


if __name__ == "__main__":
    main(sys.argv[1:])
