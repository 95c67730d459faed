"""Redis commands packed here and sent on a connection of their own: the hot path's round trips.

A call through redis-py's client takes a connection from the pool and gives it back (a lock,
observability hooks, a health check) and packs every argument generically; a pipeline adds a
command stack and a parse per reply. `PackedConnection` writes commands already in RESP and
reads their replies, one exchange at a time. Used by the crash ledger's scripts
(`streams.suspects`) and the outcome XADDs (`streams.outlets.RedisOutlet`).

`faststream_entry` is FastStream's `BinaryMessageFormatV1` envelope, byte for byte as
FastStream encodes it for ASCII headers, without its per-message codec and writer objects;
`parse_faststream_entry` reads one as FastStream's parser does.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class PackedConnection:
    """A connection of its own, made as `client`'s pool makes its connections (URL, credentials,
    TLS, database) on first use and again after it broke; one exchange at a time."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._connection: Connection | None = None
        self._one_at_a_time = asyncio.Lock()

    async def exchange(self, packed: bytes, replies: int) -> list[Any]:
        """Send `packed` (`replies` commands) and read every reply.

        A reply that is an error is raised once all of them are read (the connection stays in
        step); any other failure drops the connection, since a reply may still be on its way.
        The connection's socket timeout bounds the whole exchange: a timeout scope a reply (what
        `read_response` opens by itself) was most of the CPU of reading 128 XADD replies.
        """
        if self._connection is None:
            pool = self.client.connection_pool
            self._connection = cast(Connection, pool.connection_class(**pool.connection_kwargs))
        connection = self._connection
        answers: list[Any] = []
        error: ResponseError | None = None
        async with self._one_at_a_time:
            try:
                async with asyncio.timeout(connection.socket_timeout):
                    await connection.send_packed_command(packed, check_health=False)
                    for _ in range(replies):
                        try:
                            answers.append(await connection.read_response(timeout=math.inf))
                        except ResponseError as exc:
                            error = error or exc
                            answers.append(exc)
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
        if error is not None:
            raise error
        return answers

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.disconnect()


_ENVELOPE_MAGIC = b"\x89BIN\r\n\x1a\n" + struct.pack(">H", 1)  # identity, then version 1
_HEADERS_START = len(_ENVELOPE_MAGIC) + 8  # after the two offsets
_short = struct.Struct(">H").pack
_offsets = struct.Struct(">IIH").pack


def faststream_entry(body: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """FastStream's binary envelope (`BinaryMessageFormatV1`) of `body` with these headers, in order.

    Lengths are in bytes: FastStream's encoder writes a string's length in characters, which
    corrupts an envelope with a non-ASCII header value; its parser reads bytes, and reads these.
    """
    parts: list[bytes] = []
    for key, value in headers:
        k, v = key.encode(), value.encode()
        parts += (_short(len(k)), k, _short(len(v)), v)
    packed = b"".join(parts)
    return b"".join(
        (_ENVELOPE_MAGIC, _offsets(_HEADERS_START, _HEADERS_START + 2 + len(packed), len(headers)), packed, body)
    )


_unpack_offsets = struct.Struct(">II").unpack_from
_unpack_short = struct.Struct(">H").unpack_from


def parse_faststream_entry(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """What `BinaryMessageFormatV1.parse` returns for `data`: the body and the headers.

    A well-formed version 1 envelope is read here, with the same slices as FastStream's reader
    (4.1 -> about 1 us an entry); anything else (another format, a cut or damaged envelope)
    goes to FastStream's own parser, which decides what it is.
    """
    size = len(data)
    if size >= _HEADERS_START and data.startswith(_ENVELOPE_MAGIC):
        headers_start, data_start = _unpack_offsets(data, len(_ENVELOPE_MAGIC))
        at = headers_start + 2
        if at <= size and data_start <= size:
            (count,) = _unpack_short(data, headers_start)
            headers: dict[str, Any] = {}
            try:
                for _ in range(count):
                    if at + 2 > size:
                        break
                    (n,) = _unpack_short(data, at)
                    at += 2
                    if at + n + 2 > size:
                        break
                    key = data[at : at + n].decode()
                    at += n
                    (n,) = _unpack_short(data, at)
                    at += 2
                    if at + n > size:
                        break
                    headers[key] = data[at : at + n].decode()
                    at += n
                else:
                    return data[data_start:], headers
            except UnicodeDecodeError:
                pass
    return BinaryMessageFormatV1.parse(data)
