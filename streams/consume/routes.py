"""Subscribers from flow declarations: each flow on RabbitMQ, on Redis Streams, and its Redis reclaimer.

These FastStream subscribers are what a worker consumes with, what the AsyncAPI document lists and
what the in-memory TestBroker tests drive. The middleware (`streams.consume.middleware`) puts every message
through the Pipeline; the subscriber function runs the flow's handler with its dependency, handed
over by FastStream `Depends` (so `broker.provider.override(get_mailer, ...)` reaches it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, cast

from faststream import AckPolicy, Depends
from faststream.rabbit import RabbitBroker
from faststream.redis import RedisBroker, StreamSub

from streams.consume.batches import IN_FLIGHT, InFlight, batch_decoder, current_batch, run_batch
from streams.consume.middleware import Route, current_delivery, routed_parser
from streams.consume.pipeline import Delivery, Pipeline
from streams.core.settings import Settings
from streams.flows.catalog import FLOWS
from streams.flows.flow import Flow
from streams.transport import topology
from streams.transport.outlets import RedisOutlet
from streams.transport.publishers import Publishers, declare_flow_publishers


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


def batch_function(pipeline: Pipeline, flow: Flow[Any], outlet: RedisOutlet, in_flight: InFlight, hold: float) -> Any:
    """The function FastStream calls with the commands of one Redis read and the flow's dependency."""

    async def handle(cmds: list[Any], dependency: Any) -> None:
        async def run_one(delivery: Delivery, cmd: Any) -> None:
            ctx = delivery.envelope.context
            await pipeline.run(delivery, flow, cmd, lambda: flow.handler(cmd, ctx, dependency))

        await run_batch(pipeline, current_batch(), cmds, run_one, outlet, in_flight, hold)

    handle.__annotations__ = {
        "cmds": list[flow.command],  # type: ignore[name-defined]  # the flow's model, known at run time
        "dependency": Annotated[Any, Depends(flow.provide)],
        "return": None,
    }
    handle.__name__ = handle.__qualname__ = f"handle_{flow.name}_batch"
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
    redis_outlet = cast(RedisOutlet, pipeline.outlets["redis"])
    for flow in flows:
        pipeline.add_flow(flow)
        redis_outlet.groups[flow.stream] = flow.group
        if redis_outlet.keepalive is not None:
            redis_outlet.keepalive.groups[flow.stream] = flow.group
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

        # New entries, read together (FastStream's batch subscriber: one call a read), handled side
        # by side and acknowledged once committed (`streams.consume.batches`): a slow call is left running
        # after `hold`, so it never holds up the next read.
        in_flight = IN_FLIGHT[flow.stream] = InFlight(settings.redis_max_workers)
        redis_sub = redis.subscriber(
            stream=StreamSub(
                flow.stream,
                group=flow.group,
                consumer=consumer,
                batch=True,
                max_records=settings.redis_read_count,
                polling_interval=settings.redis_polling_ms,
            ),
            parser=routed_parser(Route(flow, flow.stream, batch=True)),
            decoder=batch_decoder,
            ack_policy=AckPolicy.MANUAL,
            title=f"{title}:redis",
            description=(
                f"{flow.description} Each stream entry is one `{flow.command.__name__}`; the worker reads "
                "entries in batches, which is why the payload reads as an array."
            ),
        )
        redis_sub(batch_function(pipeline, flow, redis_outlet, in_flight, settings.redis_batch_hold_ms / 1000))
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
