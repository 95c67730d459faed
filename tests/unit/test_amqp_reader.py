"""`streams.amqp.FrameReader` yields what aiormq's own receiver yields (pamqp's objects, equal in
every attribute) for every frame, however the socket cuts the bytes; and fails as it does."""

from __future__ import annotations

import asyncio
import datetime
import random
from collections import deque
from typing import Any

import aiormq.connection
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands as spec
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from streams import amqp
from streams.amqp import FrameReader, split_frames, unmarshal
from tests.unit.test_amqp_frames import PROPERTIES, STAMP


def _header(properties: spec.Basic.Properties, size: int = 42) -> bytes:
    return frame.marshal(ContentHeader(properties=properties, body_size=size), 3)


FRAMES: dict[str, bytes] = {
    **{f"content header: {name}": _header(p) for name, p in PROPERTIES.items()},
    "content header: millisecond timestamp": _header(spec.Basic.Properties(timestamp=STAMP)).replace(
        int(STAMP.timestamp()).to_bytes(8, "big"), (int(STAMP.timestamp()) * 1000).to_bytes(8, "big")
    ),
    "content header: a header value that is not UTF-8 (bytes, as pamqp)": _header(
        spec.Basic.Properties(headers={"raw": "x"})
    ).replace(b"S\x00\x00\x00\x01x", b"S\x00\x00\x00\x01\xff"),
    "content header: a table of every type decoded here": _header(
        spec.Basic.Properties(
            headers={
                "b": 3,
                "s": -300,
                "u": 40000,
                "I": -70000,
                "i": 3_000_000_000,
                "l": -(2**40),
                "d": 0.5,
                "t": True,
                "T": STAMP,
                "F": {"k": "v", "n": 1, "F": {}},
                "V": None,
                "S": "text",
            }
        )
    ),
    "content header: x-death as RabbitMQ writes it": _header(
        spec.Basic.Properties(
            headers={
                "x-delivery-count": 3,
                "x-first-death-queue": "email",
                "x-death": [{"count": 1, "queue": "email", "time": STAMP, "reason": "rejected"}],
            }
        )
    ),
    "content header: body of 0 and of 2**40 bytes": _header(spec.Basic.Properties(), 0)
    + _header(spec.Basic.Properties(), 2**40),
    "deliver": frame.marshal(spec.Basic.Deliver("ctag-1", 17, False, "tasks", "email"), 3),
    "deliver redelivered, empty exchange": frame.marshal(spec.Basic.Deliver("c", 2**62, True, "", "q"), 9),
    "deliver with text beyond ASCII": frame.marshal(spec.Basic.Deliver("тег", 1, False, "x.y-z", "💩"), 1),
    "ack": frame.marshal(spec.Basic.Ack(5), 2),
    "ack multiple": frame.marshal(spec.Basic.Ack(2**40, multiple=True), 2),
    "nack (pamqp)": frame.marshal(spec.Basic.Nack(5, multiple=True, requeue=False), 2),
    "body": frame.marshal(ContentBody(b'{"to": "a@example.com"}'), 3),
    "binary body": frame.marshal(ContentBody(bytes(range(256)) * 64), 3),
    "heartbeat (pamqp)": Heartbeat().marshal(),
    "channel close (pamqp)": frame.marshal(spec.Channel.Close(406, "PRECONDITION_FAILED", 50, 10), 4),
    "consume-ok (pamqp)": frame.marshal(spec.Basic.ConsumeOk("ctag-1"), 3),
}


ONE_ID = _header(spec.Basic.Properties(message_id="m"))


def _attributes(value: Any) -> Any:
    """A frame as comparable data: its type and every attribute, nested objects included."""
    if hasattr(value, "__slots__") or hasattr(value, "__dict__"):
        names = [n for n in getattr(type(value), "__slots__", ()) if hasattr(value, n)]
        names += list(getattr(value, "__dict__", {}))
        return (type(value).__name__, {n: _attributes(getattr(value, n)) for n in names})
    return (type(value).__name__, value)


def _pamqp_all(data: bytes) -> list[tuple[int, int, Any]]:
    out, pos = [], 0
    while pos < len(data):
        used, channel, value = frame.unmarshal(data[pos:])
        out.append((used, channel, _attributes(value)))
        pos += used
    return out


@pytest.mark.parametrize("name", FRAMES)
def test_each_frame_decodes_to_what_pamqp_makes(name: str) -> None:
    data = FRAMES[name]
    frames: deque[Any] = deque()
    assert split_frames(data, frames) == len(data)
    assert [(u, c, _attributes(v)) for u, c, v in frames] == _pamqp_all(data)


class _Socket:
    """A StreamReader that hands out the bytes in the chunks given, then end of file."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def read(self, _: int) -> bytes:
        await asyncio.sleep(0)
        return self.chunks.pop(0) if self.chunks else b""

    def at_eof(self) -> bool:
        return not self.chunks


async def _read_all(chunks: list[bytes]) -> list[tuple[int, int, Any]]:
    reader = FrameReader(_Socket(chunks))  # type: ignore[arg-type]
    reader.started = True  # past the handshake (aiormq's own reader reads that)
    return [(u, c, _attributes(v)) async for u, c, v in reader]


@pytest.mark.parametrize("seed", range(5))
async def test_a_stream_cut_anywhere_yields_the_same_frames_in_order(seed: int) -> None:
    data = b"".join(FRAMES.values()) * 3
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), 200))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert await _read_all(chunks) == _pamqp_all(data)


async def test_one_byte_at_a_time() -> None:
    data = FRAMES["deliver"] + FRAMES["content header: an outcome event"] + FRAMES["body"]
    assert await _read_all([data[i : i + 1] for i in range(len(data))]) == _pamqp_all(data)


async def test_the_end_of_the_stream_between_frames_ends_the_iteration() -> None:
    assert await _read_all([FRAMES["ack"]]) == _pamqp_all(FRAMES["ack"])


async def test_the_end_of_the_stream_inside_a_frame_is_a_connection_error() -> None:
    data = FRAMES["deliver"]
    with pytest.raises(AMQPConnectionError, match="inside a frame"):
        await _read_all([data[:-3]])


async def test_a_frame_without_its_end_byte_is_an_invalid_frame() -> None:
    bad = FRAMES["body"][:-1] + b"\x00"
    with pytest.raises(InvalidFrameError):
        await _read_all([FRAMES["ack"] + bad])


@pytest.mark.parametrize(
    "bad",
    [
        # every property flag set, but only one short string present
        ONE_ID[:19] + b"\xff\xfe" + ONE_ID[21:],
        frame.marshal(ContentBody(b""), 3),  # RabbitMQ never sends an empty body frame; pamqp refuses one
        b"\x01\x00\x03\x00\x00\x00\x09" + b"\x00\x3c\x00\x3c" + b"\x01c" + b"\x00\x00\x01" + b"\xce",
    ],
    ids=["flags promise more than the header holds", "empty body frame", "deliver cut inside its delivery tag"],
)
def test_a_corrupt_frame_is_refused_as_pamqp_refuses_it(bad: bytes) -> None:
    """pamqp's error (as aiormq raises it), not a guess."""
    kind, channel = bad[0], int.from_bytes(bad[1:3], "big")
    with pytest.raises(InvalidFrameError):
        unmarshal(bad, kind, channel)


def test_the_reader_starts_on_aiormq_connections_once_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    amqp.install()
    assert aiormq.connection.FrameReceiver is FrameReader


def test_the_timestamp_of_a_header_is_aware_utc() -> None:
    _, _, header = unmarshal(_header(spec.Basic.Properties(timestamp=STAMP)), 2, 3)
    assert header.properties.timestamp == STAMP
    assert header.properties.timestamp.tzinfo == datetime.UTC
