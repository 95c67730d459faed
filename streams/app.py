"""`streams.app:app`: both brokers, the whole topology, the subscribers and HTTP in one process.

Run with `faststream run streams.app:app --host 0.0.0.0 --port 8000`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.types import Scope
from faststream.rabbit import Channel, RabbitBroker
from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
from faststream.redis import RedisBroker
from faststream.redis.prometheus import RedisPrometheusMiddleware
from faststream.specification import AsyncAPI
from pydantic import ValidationError

from streams.consume.batches import IN_FLIGHT
from streams.consume.middleware import make_middleware
from streams.consume.pipeline import Pipeline
from streams.consume.routes import register
from streams.core import metrics
from streams.core.logging import configure_logging, get_logger
from streams.core.settings import describe_errors, get_settings, mask_url
from streams.eventstore import schema
from streams.eventstore.store import EventStore
from streams.flows.deps import ADAPTERS, Adapters, install
from streams.ops import asyncapi_page, health
from streams.ops.watchdog import ShutdownWatchdog
from streams.policy.limits import Limiter
from streams.policy.suspects import CrashLedger
from streams.transport import topology
from streams.transport.groups import group_keeping_connection
from streams.transport.keepalive import PendingKeepalive
from streams.transport.outlets import RabbitOutlet, RedisOutlet
from streams.transport.publishers import declare_publishers
from streams.transport.scheduler import Mover

try:
    settings = get_settings()
except ValidationError as exc:  # refuse to start, naming each bad variable, without a traceback
    raise SystemExit(f"pipeline: invalid settings: {describe_errors(exc)}") from None
configure_logging(settings.log_level, settings.log_format)
log = get_logger("pipeline.app")


def consumer_name() -> str:
    """The outbox owner (and the name in the start-up line) unique to the calling process."""
    return settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


CONSUMER = consumer_name()  # renewed at start-up: a worker forked from this process is another owner
# The Redis consumer name every worker reads under (the AsyncAPI document shows it): what a worker
# holds is kept its own by id (streams.transport.keepalive), so workers need no names of their own.
REDIS_CONSUMER = settings.consumer_name or "worker"
REDIS_POOL_WAIT = 30.0  # seconds a Redis call waits for a free connection before it fails
store = EventStore(
    settings.database_url,
    owner=CONSUMER,
    max_batch=settings.store_batch_max,
    max_wait=settings.store_batch_wait_ms / 1000,
)
# Calls beyond the pool's size wait for a free connection (redis-py's default pool raises instead):
# a worker with hundreds of messages in flight must slow down, not fail them.
redis_client: aioredis.Redis = aioredis.Redis(
    connection_pool=aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=REDIS_POOL_WAIT
    )
)
crash_ledger = CrashLedger(redis_client)
limiter = Limiter(
    redis_client,
    settings.limits,
    max_wait=settings.limit_max_wait,
    lease_seconds={"mailer": settings.mailer_timeout, "llm": settings.llm_timeout},
)
pipeline = Pipeline(settings, store, crashes=crash_ledger, limiter=limiter)

rabbit = RabbitBroker(
    settings.rabbit_url,
    # Prefetch on the default channel: the consumers live there (the topology declared at start-up
    # binds the queue objects FastStream caches to it).
    default_channel=Channel(prefetch_count=settings.rabbit_prefetch),
    specification_url=mask_url(settings.rabbit_url),
    graceful_timeout=settings.graceful_timeout,
    description="Commands on exchange `tasks`, outcome events on topic exchange `events`.",
    logger=logging.getLogger("faststream.rabbit"),
    log_level=logging.DEBUG,  # per-message lines come from the pipeline, with every id bound
    middlewares=[RabbitPrometheusMiddleware(registry=metrics.REGISTRY, app_name=settings.service_name)],
)
redis = RedisBroker(
    settings.redis_url,
    specification_url=mask_url(settings.redis_url),
    graceful_timeout=settings.graceful_timeout,
    description="Commands on streams `email` and `ai.completion`, outcome events on stream `events`.",
    logger=logging.getLogger("faststream.redis"),
    log_level=logging.DEBUG,
    connection_class=group_keeping_connection(settings.redis_url, topology.COMMAND_STREAMS),
    middlewares=[RedisPrometheusMiddleware(registry=metrics.REGISTRY, app_name=settings.service_name)],
)

publishers = declare_publishers(rabbit, redis)
rabbit_outlet = RabbitOutlet(publishers.rabbit_events, publishers.rabbit_dead_letters, publishers.rabbit_delay)
redis_outlet = RedisOutlet(publishers.redis_events, redis_client, dict(topology.COMMAND_STREAMS))
keepalive = PendingKeepalive(redis_client, dict(topology.COMMAND_STREAMS), REDIS_CONSUMER, settings.redis_claim_idle_ms)
redis_outlet.keepalive = keepalive
mover = Mover(redis_client, [s for s, _ in topology.COMMAND_STREAMS], settings.redis_mover_interval_ms / 1000)
pipeline.attach(rabbit_outlet)
pipeline.attach(redis_outlet)
rabbit.add_middleware(make_middleware(pipeline, rabbit_outlet))
redis.add_middleware(make_middleware(pipeline, redis_outlet))

subscribers = register(rabbit, redis, pipeline, settings, publishers, consumer=REDIS_CONSUMER)
# In-flight handlers get the graceful timeout, the outbox flush half of it; then connections close.
watchdog = ShutdownWatchdog(deadline=2 * settings.graceful_timeout + 10)


async def on_startup() -> None:
    """Connect the store, choose adapters, declare the topology before any subscriber starts."""
    # uvicorn configured its own loggers after import: route them through structlog again.
    configure_logging(settings.log_level, settings.log_format)
    # Refuses to start on an outdated schema, naming the command that upgrades it.
    await schema.prepare(settings.database_url, auto_upgrade=settings.auto_upgrade)
    await store.start(create=False)
    install(Adapters.from_settings(settings))
    global CONSUMER  # noqa: PLW0603 - one identity per process, set where the process starts working
    CONSUMER = store.owner = consumer_name()
    crash_ledger.start()
    asyncapi_page.check_assets()  # a warning only: the worker runs without its docs page
    await rabbit.connect()
    await topology.declare_rabbit(rabbit)
    connection = await rabbit.connect()
    rabbit_outlet.use_channel(await connection.channel(publisher_confirms=True))
    await topology.declare_redis(redis_client)
    mover.start()
    pipeline.relay.start()
    pipeline.monitor.start()
    limiter.start()
    keepalive.start()
    log.info("starting", consumer=CONSUMER, settings=settings.safe_dump())


# Called once every broker consumes (the fork server learns that its worker started for real).
READY_CALLBACKS: list[Callable[[], None]] = []


async def after_startup() -> None:
    """Tell whoever waits that this worker is consuming."""
    # What start-up made lives as long as the worker: out of the collector's sight, a full
    # collection walks only what handling creates, so it stops the loop for less time.
    gc.freeze()
    for callback in READY_CALLBACKS:
        callback()


async def on_shutdown() -> None:
    """Stop fetching, let in-flight handlers finish, then flush the outbox while brokers are still up."""
    watchdog.arm()
    await asyncio.gather(*(sub.stop() for sub in subscribers.values()))
    await asyncio.gather(*(entries.drain(settings.graceful_timeout) for entries in IN_FLIGHT.values()))
    await mover.stop()  # scheduled retries stay in Redis for the next mover
    await pipeline.monitor.stop()
    await limiter.stop()
    await pipeline.relay.stop(flush_timeout=settings.graceful_timeout / 2)


async def after_shutdown() -> None:
    """Close what on_startup opened, after the brokers stopped consuming."""
    await keepalive.stop()
    await crash_ledger.stop()
    await pipeline.close()
    await redis_outlet.close()
    await ADAPTERS.close()
    await redis_client.aclose()
    await store.close()
    watchdog.disarm()


async def _rabbit_ok() -> bool:
    return await rabbit.ping(timeout=2.0)


async def _redis_ok() -> bool:
    return bool(await redis_client.ping())


async def _sample_queues() -> None:
    for name in topology.COMMAND_QUEUES:
        queue = await rabbit.declare_queue(topology.command_queue(name))
        depth = queue.declaration_result.message_count or 0
        metrics.QUEUE_DEPTH.labels("rabbit", name).set(depth)
        pipeline.monitor.activity("rabbit", name).depth = depth


async def _sample_streams() -> None:
    for stream, group in topology.COMMAND_STREAMS:
        for info in await redis_client.xinfo_groups(stream):
            if info["name"].decode() == group:
                lag = int(info.get("lag") or 0) + int(info.get("pending") or 0)
                metrics.STREAM_LAG.labels(stream, group).set(lag)
                pipeline.monitor.activity("redis", stream).depth = lag


async def _sample_outbox() -> None:
    backlog, age = await store.outbox_backlog()
    metrics.OUTBOX_BACKLOG.set(backlog)
    metrics.OUTBOX_AGE.set(age)


pipeline.monitor.samplers.extend([_sample_queues, _sample_streams, _sample_outbox])


@get(include_in_schema=False)
async def metrics_endpoint(scope: Scope) -> AsgiResponse:
    """Prometheus exposition of FastStream's and the pipeline's metrics."""
    body, content_type = metrics.render()
    return AsgiResponse(body, 200, headers={"content-type": content_type})


def _consumers() -> list[health.Consumer]:
    found = []
    for name, sub in subscribers.items():
        broker, source = name.split(":")[:2]
        found.append(health.Consumer(name, sub, broker, source))
    return found


app = AsgiFastStream(
    rabbit,
    redis,
    asgi_routes=[
        *health.make_routes(
            {"rabbitmq": _rabbit_ok, "redis": _redis_ok, "database": store.ping},
            _consumers,
            lambda: pipeline.breakers,
            pipeline.monitor,
            limiter.status,
        ),
        ("/metrics", metrics_endpoint),
    ],
    specification=AsyncAPI(
        title="pipeline",
        version="0.1.0",
        description=(
            "Event-sourced message pipeline. Publish commands to exchange `tasks` (RabbitMQ) or "
            "streams `email` / `ai.completion` (Redis); read outcomes on `events`. Failures end in "
            "`<queue>.dlq` with headers x-failure-kind, x-exception-type, x-exception-message, "
            "x-exception-stacktrace, x-original-queue, x-attempts, x-first-failure-at, "
            "x-last-failure-at, message-id, correlation-id."
        ),
    ),
    on_startup=[on_startup],
    after_startup=[after_startup],
    on_shutdown=[on_shutdown],
    after_shutdown=[after_shutdown],
)
# The AsyncAPI page (no try-it-out: nothing on the HTTP side publishes), its script and stylesheet
# served from here rather than a CDN, and the document at /docs/asyncapi.json.
for _path, _route in asyncapi_page.make_routes("/docs/asyncapi", app.schema):
    app.mount(_path, _route)
