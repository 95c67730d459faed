"""Dead letters kept for review: query them, replay them through the normal path, purge them.

The `dead_letters` table of the event store is the review store. Replaying a dead letter puts
its original bytes back where they first arrived (RabbitMQ: the default exchange, routing key =
the queue; Redis: XADD to the stream) with the same message id and correlation id, without the
failure and retry headers (so the attempt count starts again at 1) and with `x-replayed-from`
naming the dead letter. A row is marked replayed only after the broker confirmed the publish.

Modules: `model` (rows, selections, errors, safe text), `queries` (the review store),
`replays` (what goes back on the wire, pacing, the replay loop), `brokers` (RabbitMQ and Redis).
Callers use the names re-exported here, looked up on this package (`deadletters.broker_publisher`),
so a test can swap one in a single place.
"""

from __future__ import annotations

from streams.deadletters.brokers import BrokerPublisher, broker_dlqs, broker_publisher
from streams.deadletters.model import (
    BrokerError,
    DeadLetter,
    DeadLetterError,
    PurgeGroup,
    PurgePlan,
    Selection,
    StoreError,
    body_text,
    decode_fields,
    printable,
    reason,
    redact,
)
from streams.deadletters.queries import (
    count_letters,
    get_letter,
    letters_to_replay,
    list_letters,
    mark_replayed,
    missing_sqlite_file,
    open_store,
    plan_purge,
    purge,
)
from streams.deadletters.replays import (
    DATA_KEY,
    FAILURE_HEADER_PREFIXES,
    FAILURE_HEADERS,
    H_REPLAYED_FROM,
    Publish,
    RabbitReplay,
    Throttle,
    is_failure_header,
    rabbit_replay,
    redis_entry,
    replay,
    replay_headers,
)

__all__ = [
    "DATA_KEY",
    "FAILURE_HEADERS",
    "FAILURE_HEADER_PREFIXES",
    "H_REPLAYED_FROM",
    "BrokerError",
    "BrokerPublisher",
    "DeadLetter",
    "DeadLetterError",
    "Publish",
    "PurgeGroup",
    "PurgePlan",
    "RabbitReplay",
    "Selection",
    "StoreError",
    "Throttle",
    "body_text",
    "broker_dlqs",
    "broker_publisher",
    "count_letters",
    "decode_fields",
    "get_letter",
    "is_failure_header",
    "letters_to_replay",
    "list_letters",
    "mark_replayed",
    "missing_sqlite_file",
    "open_store",
    "plan_purge",
    "printable",
    "purge",
    "rabbit_replay",
    "reason",
    "redact",
    "redis_entry",
    "replay",
    "replay_headers",
]
