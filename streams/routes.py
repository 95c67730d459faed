"""Subscribers from flow declarations: each flow on RabbitMQ, on Redis Streams, and its Redis reclaimer.

These FastStream subscribers are what a worker consumes with, what the AsyncAPI document lists and
what the in-memory TestBroker tests drive. The middleware (`streams.middleware`) puts every message
through the Pipeline; the subscriber function runs the flow's handler with its dependency, handed
over by FastStream `Depends` (so `broker.provider.override(get_mailer, ...)` reaches it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from faststream import Depends
from faststream.rabbit import RabbitBroker
from faststream.redis import RedisBroker, StreamSub

from streams import topology
from streams.flow import Flow
from streams.flows import FLOWS
from streams.middleware import Route, current_delivery, routed_parser
from streams.pipeline import Pipeline
from streams.publishers import Publishers, declare_flow_publishers
from streams.settings import Settings


def subscriber_function(pipeline: Pipeline, flow: Flow[Any]) -> Any:
    """The function FastStream calls with the validated command and the flow's dependency."""

    async def handle(cmd: Any, dependency: Any) -> None:
        delivery = current_delivery()
        ctx = delivery.envelope.context
        await pipeline.run(delivery, flow, cmd, lambda: flow.handler(cmd, ctx, dependency))

    # FastStream validates the body against the first parameter's type (and documents it in the
    # AsyncAPI document) and resolves the second through `Depends`: both are the flow's own.
    handle.__annotations__ = {
        "cmd": flow.command,
        "dependency": Annotated[Any, Depends(flow.provide)],
        "return": None,
    }
    handle.__name__ = handle.__qualname__ = f"handle_{flow.name}"
    return handle


def register(
    rabbit: RabbitBroker,
    redis: RedisBroker,
    pipeline: Pipeline,
    settings: Settings,
    publishers: Publishers,
    *,
    consumer: str,
    flows: Iterable[Flow[Any]] = FLOWS,
) -> dict[str, Any]:
    """Subscribe every flow on both brokers, declare its publishers (into `publishers`, which the
    outlets publish through); returns the subscribers by `broker:source[:reclaim]` name."""
    subscribers: dict[str, Any] = {}
    for flow in flows:
        pipeline.add_flow(flow)
        declare_flow_publishers(rabbit, redis, flow, publishers)
        function = subscriber_function(pipeline, flow)
        title = f"{flow.queue}:{flow.command.__name__}"

        rabbit_sub = rabbit.subscriber(
            topology.command_queue(flow.queue),
            topology.TASKS,
            parser=routed_parser(Route(flow, flow.queue)),
            title=title,
            description=flow.description,
        )
        rabbit_sub(function)
        subscribers[f"rabbit:{flow.queue}"] = rabbit_sub

        # New entries, handled side by side (FastStream's concurrent subscriber): a slow call
        # holds one of `max_workers` places, never the entries read with it.
        redis_sub = redis.subscriber(
            stream=StreamSub(
                flow.stream,
                group=flow.group,
                consumer=consumer,
                max_records=settings.redis_read_count,
                polling_interval=settings.redis_polling_ms,
            ),
            parser=routed_parser(Route(flow, flow.stream)),
            max_workers=settings.redis_max_workers,
            title=f"{title}:redis",
            description=flow.description,
        )
        redis_sub(function)
        subscribers[f"redis:{flow.stream}"] = redis_sub

        # Entries another consumer read and left pending past the claim time: it died holding them.
        reclaim_sub = redis.subscriber(
            stream=StreamSub(
                flow.stream,
                group=flow.group,
                consumer=consumer,
                polling_interval=settings.redis_reclaim_polling_ms,
                min_idle_time=settings.redis_claim_idle_ms,
            ),
            parser=routed_parser(Route(flow, flow.stream, reclaims=True)),
            include_in_schema=False,
        )
        reclaim_sub(function)
        subscribers[f"redis:{flow.stream}:reclaim"] = reclaim_sub
    return subscribers
