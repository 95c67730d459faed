"""Dramatiq on RabbitMQ sending each e-mail with a sync httpx2.Client per worker thread.

The actor validates `SendEmail`, POSTs `{to, subject, body, template}` with `Idempotency-Key: <message
id>`, and raises on a non-2xx (Dramatiq's Retries middleware retries it with backoff, then parks it in
`<queue>.XQ`). With `--rate-limit N`, the POST runs inside Dramatiq's own `WindowRateLimiter` (N per
1 s window) on a `RedisBackend`: beyond it `RateLimitExceeded` is raised and the message retried with
backoff, the idiom of Dramatiq's cookbook. Runs until SIGTERM; the provider counts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import dramatiq
import httpx2
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.rate_limits import WindowRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

from bench.io.config import DRAMATIQ_LIMITER_KEY
from schemas import SendEmail

ACTOR = "send_email_http"
# Backoff of a rate-limited or refused call: 1 s (the provider's Retry-After) doubling up to 10 s, 20 tries.
# Dramatiq's defaults (15 s doubling up to 7 days) would leave a 5,000-message run waiting for hours.
RETRIES: dict[str, Any] = {"max_retries": 20, "min_backoff": 1_000, "max_backoff": 10_000}


def make_broker(url: str) -> RabbitmqBroker:
    """The broker every process (publisher and worker) declares the actor on."""
    broker = RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)
    return broker


def declare_actor(
    broker: RabbitmqBroker, queue_name: str, mailer_url: str | None = None, limiter: WindowRateLimiter | None = None
) -> None:
    """The actor on `queue_name` (without a mailer URL: declared only, to enqueue and to declare queues)."""
    local = threading.local()

    def client() -> httpx2.Client:
        if not hasattr(local, "client"):
            local.client = httpx2.Client(timeout=10.0, trust_env=False)
        found: httpx2.Client = local.client
        return found

    def send_email(data: dict[str, Any], message_id: str) -> None:
        mail = SendEmail.model_validate(data)
        payload = {"to": str(mail.to), "subject": mail.subject, "body": mail.body, "template": mail.template}
        guard: AbstractContextManager[Any] = limiter.acquire() if limiter is not None else nullcontext()
        with guard:
            assert mailer_url is not None
            response = client().post(mailer_url, json=payload, headers={"Idempotency-Key": message_id})
        response.raise_for_status()

    dramatiq.actor(actor_name=ACTOR, queue_name=queue_name, broker=broker, **RETRIES)(send_email)


def encode(queue_name: str, payload: dict[str, Any], message_id: str) -> bytes:
    """One Dramatiq message body, as `send_email_http.send(payload, message_id)` would publish it."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue_name,
        actor_name=ACTOR,
        args=(payload, message_id),
        kwargs={},
        options={},
        message_id=message_id,
    )
    encoded: bytes = message.encode()
    return encoded


def declare(url: str, queue_name: str) -> None:
    """Declare Dramatiq's queues (its own arguments: queue, `.DQ`, `.XQ`) and purge them."""
    broker = make_broker(url)
    declare_actor(broker, queue_name)
    broker.declare_queue(queue_name, ensure=True)
    broker.flush(queue_name)
    broker.close()


def serve(url: str, queue_name: str, mailer_url: str, threads: int, redis_url: str, rate_limit: int) -> None:
    """A Dramatiq worker with `threads` threads until SIGTERM."""
    broker = make_broker(url)
    limiter = None
    if rate_limit > 0:
        backend = RedisBackend(url=redis_url)
        limiter = WindowRateLimiter(backend, DRAMATIQ_LIMITER_KEY, limit=rate_limit, window=1)  # type: ignore[no-untyped-call]  # dramatiq leaves __init__ unannotated
    declare_actor(broker, queue_name, mailer_url, limiter)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = dramatiq.Worker(broker, worker_threads=threads)
    worker.start()
    print("ready", flush=True)
    stop.wait()
    worker.stop()
    broker.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.io.contenders.dramatiq_http --url AMQP --queue Q --mailer-url URL [--rate-limit N]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--mailer-url", required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--rate-limit", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.url, args.queue, args.mailer_url, args.threads, args.redis_url, args.rate_limit)


if __name__ == "__main__":
    main(sys.argv[1:])
