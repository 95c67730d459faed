"""A minimal HTTP/1.1 server side on `asyncio.Protocol`: keep-alive, Content-Length bodies, JSON answers.

One request at a time per connection (what httpx and other clients send without pipelining), each
answered by an async `dispatch` in its own task; chunked bodies are refused with 411.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 413: "Payload Too Large"}
REASONS |= {429: "Too Many Requests", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: status, JSON body, extra headers."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


Dispatch = Callable[[str, str, dict[str, str], bytes], Awaitable[Reply]]


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests parsed by Content-Length, answered one at a time, kept alive."""

    def __init__(self, dispatch: Dispatch, tasks: set[asyncio.Task[None]]) -> None:
        self._dispatch = dispatch
        self._tasks = tasks  # every answer in progress, to cancel on shutdown
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass, but one in kind

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._next()

    def _next(self) -> None:
        if self._busy or self._transport is None:
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._send(Reply(431, {"error": "header too large"}), close=True)
            return
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            self._send(Reply(400, {"error": "bad request line"}), close=True)
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._send(Reply(411, {"error": "send Content-Length"}), close=True)
            return
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY:
            self._send(Reply(413, {"error": "body too large"}), close=True)
            return
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        close = headers.get("connection", "").lower() == "close"
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._answer(method, target, headers, body, close))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, method: str, target: str, headers: dict[str, str], body: bytes, close: bool) -> None:
        try:
            reply = await self._dispatch(method, target, headers, body)
        except asyncio.CancelledError:
            if self._transport is not None:
                self._transport.abort()
            raise
        self._busy = False
        self._send(reply, close=close)
        self._next()

    def _send(self, reply: Reply, *, close: bool) -> None:
        if self._transport is None:
            return
        payload = json.dumps(reply.body).encode()
        head = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Status')}"]
        head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(payload)}")
        head.extend(f"{name}: {value}" for name, value in reply.headers)
        if close:
            head.append("Connection: close")
        self._transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        if close:
            self._transport.close()
