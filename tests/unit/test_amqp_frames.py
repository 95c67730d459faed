"""`streams.amqp.publish_frames` writes the bytes pamqp writes for the same publishes, whatever the
properties: the broker cannot tell the pipeline's own encoding from aiormq's `basic_publish`."""

from __future__ import annotations

import datetime
import time
from decimal import Decimal

import pytest
from pamqp import commands as spec
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from streams.amqp import Message, encode_properties, publish_frames

STAMP = datetime.datetime(2026, 12, 2, 21, 59, 34, tzinfo=datetime.UTC)


def _pamqp(channel: int, exchange: str, messages: list[Message], max_content: int) -> bytes:
    """The same publishes as aiormq's basic_publish frames them (pamqp's marshal of each frame)."""
    out = []
    for routing_key, body, properties in messages:
        out.append(frame.marshal(spec.Basic.Publish(exchange=exchange, routing_key=routing_key), channel))
        out.append(frame.marshal(ContentHeader(properties=properties, body_size=len(body)), channel))
        out.extend(
            frame.marshal(ContentBody(body[i : i + max_content]), channel) for i in range(0, len(body), max_content)
        )
    return b"".join(out)


PROPERTIES = {
    "none": spec.Basic.Properties(),
    "an outcome event": spec.Basic.Properties(
        delivery_mode=2,
        message_id="0193a1b2-1111-7222-8333-444455556666",
        correlation_id="c-1",
        content_type="application/json",
        timestamp=STAMP,
        headers={"x-message-id": "m-1", "x-event-type": "email.sent"},
    ),
    "every property": spec.Basic.Properties(
        content_type="text/plain",
        content_encoding="gzip",
        headers={"b": "2", "a": "1"},
        delivery_mode=1,
        priority=9,
        correlation_id="c",
        reply_to="amq.rabbitmq.reply-to",
        expiration="60000",
        message_id="m",
        timestamp=STAMP,
        message_type="t",
        user_id="guest",
        app_id="pipeline",
    ),
    "text beyond ASCII": spec.Basic.Properties(
        message_id="é-💩", correlation_id="\x00nul", headers={"ключ": "значение", "x-exception-message": "ü" * 300}
    ),
    "empty strings and an empty table are left out": spec.Basic.Properties(content_type="", message_id="", headers={}),
    "a table of other types (pamqp encodes it)": spec.Basic.Properties(
        headers={
            "count": 3,
            "big": 2**40,
            "ok": True,
            "ratio": 0.5,
            "price": Decimal("1.25"),
            "raw": bytearray(b"\x00\xff"),
            "when": STAMP,
            "nested": {"k": "v"},
            "list": [1, "two"],
            "nothing": None,
        }
    ),
    "a naive timestamp (taken as UTC)": spec.Basic.Properties(timestamp=STAMP.replace(tzinfo=None)),
    "a struct_time timestamp": spec.Basic.Properties(timestamp=time.gmtime(1_700_000_000)),  # type: ignore[arg-type]
    "a field name past 128 bytes (pamqp truncates it)": spec.Basic.Properties(headers={"k" * 200: "v"}),
}


@pytest.mark.parametrize("name", PROPERTIES)
def test_the_properties_are_encoded_as_pamqp_encodes_them(name: str) -> None:
    properties = PROPERTIES[name]
    assert encode_properties(properties) == properties.marshal()


@pytest.mark.parametrize(
    ("body", "max_content"),
    [(b"", 131_064), (b'{"n": 1}', 131_064), (b"x" * 10, 10), (b"x" * 11, 10), (bytes(range(256)) * 100, 4096)],
    ids=["empty body: no body frame", "small", "exactly one frame", "one byte over", "many frames"],
)
def test_a_batch_of_publishes_is_framed_as_pamqp_frames_it(body: bytes, max_content: int) -> None:
    messages: list[Message] = [(f"email.{i}", body, p) for i, p in enumerate(PROPERTIES.values())]
    assert publish_frames(7, "events", messages, max_content) == _pamqp(7, "events", messages, max_content)


def test_a_property_pamqp_refuses_is_refused() -> None:
    """A message id past 255 bytes cannot be a short string: refused, nothing half-encoded."""
    too_long = spec.Basic.Properties(message_id="m" * 256)
    with pytest.raises(TypeError):
        too_long.marshal()
    with pytest.raises(TypeError, match="255"):
        encode_properties(too_long)
