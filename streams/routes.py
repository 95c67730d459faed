"""The routing table: which subscriber feeds which handler, on which broker, publishing where.

| command            | RabbitMQ queue (exchange `tasks`) | Redis stream (group)          | handler                 |
|--------------------|-----------------------------------|-------------------------------|-------------------------|
| SendEmail          | `email`                           | `email` (`email-workers`)     | handlers.email          |
| RequestCompletion  | `ai.completion`                   | `ai.completion` (`ai-workers`)| handlers.completion     |

Every handler's outcome goes to `events` on the broker the command came from.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from faststream.rabbit import RabbitBroker
from faststream.redis import RedisBroker, StreamSub

from handlers import completion, email
from schemas import Event, MessageContext, RequestCompletion, SendEmail
from streams import names, topology
from streams.deps import ADAPTERS, MailerDep, ModelDep
from streams.flows import COMPLETION, EMAIL
from streams.lanes import Lane, RabbitLane, RedisLane
from streams.middleware import current_delivery
from streams.parsing import tolerant_redis_parser
from streams.pipeline import Pipeline
from streams.settings import Settings

# The AsyncAPI document shows this placeholder; each process takes a unique name at start-up.
CONSUMER_PLACEHOLDER = "worker"


def register(rabbit: RabbitBroker, redis: RedisBroker, pipeline: Pipeline, settings: Settings) -> dict[str, Any]:
    """Subscribe every flow on both brokers; returns the subscribers by `broker:queue` name."""

    def stream(name: str, group: str, *, reclaim: bool = False) -> StreamSub:
        """New entries of a stream; with `reclaim`, entries another consumer left pending too long."""
        return StreamSub(
            name,
            group=group,
            consumer=CONSUMER_PLACEHOLDER,
            max_records=settings.redis_read_count,
            polling_interval=settings.redis_polling_ms,
            min_idle_time=settings.redis_claim_idle_ms if reclaim else None,
        )

    rabbit_send_email_sub = rabbit.subscriber(
        topology.command_queue(names.EMAIL_QUEUE),
        topology.TASKS,
        title="email:SendEmail",
        description="Send an e-mail; answers `email.sent` or `email.failed`.",
    )

    @rabbit_send_email_sub
    async def rabbit_send_email(cmd: SendEmail, mailer: MailerDep) -> None:
        delivery = current_delivery()
        await pipeline.run(delivery, EMAIL, cmd, lambda: email.send_email(cmd, delivery.envelope.context, mailer))

    rabbit_complete_sub = rabbit.subscriber(
        topology.command_queue(names.COMPLETION_QUEUE),
        topology.TASKS,
        title="ai.completion:RequestCompletion",
        description="Run an LLM completion; answers `completion.succeeded` or `completion.failed`.",
    )

    @rabbit_complete_sub
    async def rabbit_complete(cmd: RequestCompletion, model: ModelDep) -> None:
        delivery = current_delivery()
        await pipeline.run(
            delivery, COMPLETION, cmd, lambda: completion.complete(cmd, delivery.envelope.context, model)
        )

    redis_send_email_sub = redis.subscriber(
        stream=stream(names.EMAIL_STREAM, names.EMAIL_GROUP),
        parser=tolerant_redis_parser,
        max_workers=settings.redis_max_workers,
        title="email:SendEmail:redis",
        description="Send an e-mail; answers `email.sent` or `email.failed`.",
    )

    redis_send_email_reclaim_sub = redis.subscriber(
        stream=stream(names.EMAIL_STREAM, names.EMAIL_GROUP, reclaim=True),
        parser=tolerant_redis_parser,
        include_in_schema=False,
    )

    @redis_send_email_sub
    async def redis_send_email(cmd: SendEmail, mailer: MailerDep) -> None:
        delivery = current_delivery()
        await pipeline.run(delivery, EMAIL, cmd, lambda: email.send_email(cmd, delivery.envelope.context, mailer))

    redis_complete_sub = redis.subscriber(
        stream=stream(names.COMPLETION_STREAM, names.COMPLETION_GROUP),
        parser=tolerant_redis_parser,
        max_workers=settings.redis_max_workers,
        title="ai.completion:RequestCompletion:redis",
        description="Run an LLM completion; answers `completion.succeeded` or `completion.failed`.",
    )

    redis_send_email_reclaim_sub(redis_send_email)  # the same handler, for reclaimed entries

    redis_complete_reclaim_sub = redis.subscriber(
        stream=stream(names.COMPLETION_STREAM, names.COMPLETION_GROUP, reclaim=True),
        parser=tolerant_redis_parser,
        include_in_schema=False,
    )

    @redis_complete_sub
    async def redis_complete(cmd: RequestCompletion, model: ModelDep) -> None:
        delivery = current_delivery()
        await pipeline.run(
            delivery, COMPLETION, cmd, lambda: completion.complete(cmd, delivery.envelope.context, model)
        )

    redis_complete_reclaim_sub(redis_complete)

    return {
        f"rabbit:{names.EMAIL_QUEUE}": rabbit_send_email_sub,
        f"rabbit:{names.COMPLETION_QUEUE}": rabbit_complete_sub,
        f"redis:{names.EMAIL_STREAM}": redis_send_email_sub,
        f"redis:{names.COMPLETION_STREAM}": redis_complete_sub,
        f"redis:{names.EMAIL_STREAM}:reclaim": redis_send_email_reclaim_sub,
        f"redis:{names.COMPLETION_STREAM}:reclaim": redis_complete_reclaim_sub,
    }


async def _send_email(cmd: SendEmail, ctx: MessageContext) -> Event:
    return await email.send_email(cmd, ctx, ADAPTERS.mailer)


async def _complete(cmd: RequestCompletion, ctx: MessageContext) -> Event:
    return await completion.complete(cmd, ctx, ADAPTERS.model)


def build_lanes(pipeline: Pipeline, client: aioredis.Redis, settings: Settings) -> dict[str, Lane]:
    """The lanes of the same routes (streams.lanes), by the name of the subscriber each replaces."""
    if not settings.lanes:
        return {}
    found: list[Lane] = []
    for flow, handler, queue, (stream, group) in (
        (EMAIL, _send_email, names.EMAIL_QUEUE, (names.EMAIL_STREAM, names.EMAIL_GROUP)),
        (COMPLETION, _complete, names.COMPLETION_QUEUE, (names.COMPLETION_STREAM, names.COMPLETION_GROUP)),
    ):
        found.append(
            RabbitLane(pipeline, flow, handler, queue, prefetch=settings.rabbit_prefetch, batches=settings.lane_batches)
        )
        found.append(
            RedisLane(
                pipeline,
                flow,
                handler,
                client,
                stream,
                group,
                count=settings.redis_read_count,
                max_in_flight=settings.redis_max_workers,
                block_ms=settings.redis_polling_ms,
                batches=settings.lane_batches,
            )
        )
    return {lane.name: lane for lane in found}
