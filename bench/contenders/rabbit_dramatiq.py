"""(c) Dramatiq on RabbitMQ: a `Worker` with 8 threads (its default middleware), an actor validating `SendEmail`.

Dramatiq is thread-based: it runs no event loop. Its queue is the classic queue Dramatiq declares
for itself (it refuses a quorum queue), and its messages are Dramatiq's JSON envelope around the
same `SendEmail` fields.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from pydantic import ValidationError

from bench.contenders.meter import Meter, arguments, write
from schemas import SendEmail

ACTOR = "send_email"


def make_broker(url: str, queue_name: str, meter: Meter | None, done: threading.Event | None) -> RabbitmqBroker:
    """A broker with the benchmark actor declared on `queue_name`."""
    broker = RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)

    def send_email(data: dict[str, Any]) -> None:
        if meter is None or done is None:
            return
        try:
            SendEmail.model_validate(data)
        except ValidationError:
            meter.invalid += 1
        if meter.tick_threadsafe():
            done.set()

    dramatiq.actor(actor_name=ACTOR, queue_name=queue_name, max_retries=0, broker=broker)(send_email)
    return broker


def encode(queue_name: str, payload: dict[str, Any], message_id: str) -> bytes:
    """One Dramatiq message body, as `send_email.send(payload)` would publish it."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue_name, actor_name=ACTOR, args=(payload,), kwargs={}, options={}, message_id=message_id
    )
    encoded: bytes = message.encode()
    return encoded


def declare(url: str, queue_name: str) -> None:
    """Declare Dramatiq's queues (its own arguments) and purge them."""
    broker = make_broker(url, queue_name, None, None)
    broker.declare_queue(queue_name, ensure=True)
    broker.flush(queue_name)
    broker.close()


def consume(url: str, queue_name: str, n: int, threads: int, max_seconds: float) -> Meter:
    """Drain n messages with a Dramatiq worker."""
    meter = Meter(n, max_seconds)
    done = threading.Event()
    broker = make_broker(url, queue_name, meter, done)
    worker = dramatiq.Worker(broker, worker_threads=threads)
    worker.start()
    done.wait()
    result = meter
    worker.stop()
    broker.close()
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.contenders.rabbit_dramatiq --url ... --name QUEUE --n N --out FILE`."""
    parser = arguments(__doc__ or "")
    parser.add_argument("--declare-only", action="store_true")
    args = parser.parse_args(argv)
    if args.declare_only:
        declare(args.url, args.name)
        return
    meter = consume(args.url, args.name, args.n, args.threads, args.max_seconds)
    write(args.out, meter.result())


if __name__ == "__main__":
    main(sys.argv[1:])
