"""Local provider simulators over real HTTP on 127.0.0.1: an e-mail API and an OpenAI-compatible model.

Both are plain asyncio (`asyncio.Protocol`, HTTP/1.1 keep-alive, Content-Length bodies): thousands of
requests a second on one core, a task per request, no thread per request. Each runs

- in-process, on its own event loop in a daemon thread, as a context manager:

      with MailProvider(latency=0.1, limit=200) as mail:
          ...  # PIPELINE_MAILER_URL=mail.endpoint
          mail.wait_for(lambda s: s.accepted >= 10)  # woken by every change; `await wait_for_async(...)`
          assert mail.stats().rejected == 0
          mail.hold()  # accepted requests stay in flight until mail.release()

- or as a process: `python -m tests.providers mail --port 0 --latency 0.1 --limit 200`, which prints
  its base URL (`http://127.0.0.1:PORT`) as the first line of stdout and serves until SIGTERM.

Either way `GET /stats` answers the counters as JSON (`ProviderStats.as_json`) and `POST /stats/reset`
zeroes them. `MailProvider` answers any other POST (e.g. `/send`) after `latency` seconds with 200
`{"id": ...}`; beyond `limit` accepted requests in a sliding `window` (1 s) it answers 429 with
`Retry-After` at once. `ModelProvider` answers `POST /v1/chat/completions` after `latency` (1 s) with
an OpenAI-shaped completion whose token counts are deterministic (prompt: ceil(characters / 4) over
the messages' contents; completion: `completion_tokens`), and 429 beyond `tokens_per_minute` in a
sliding 60 s window. A duplicate is an accepted request whose `Idempotency-Key` was accepted before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from types import TracebackType
from typing import Any, Self, cast

__all__ = ("MailProvider", "ModelProvider", "Provider", "ProviderStats", "Reply", "http_date")

_MAX_HEAD = 64 * 1024
_MAX_BODY = 8 * 1024 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 413: "Payload Too Large"}
_REASONS |= {429: "Too Many Requests", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}

RetryAfter = str | Callable[[], str] | None


def http_date(seconds_from_now: float = 1.0) -> str:
    """An HTTP date (`Retry-After`'s other form) that many seconds from now."""
    return formatdate(time.time() + seconds_from_now, usegmt=True)


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: status, JSON body, extra headers."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ProviderStats:
    """A snapshot of a provider's counters.

    `max_accepted_1s` is the most requests accepted in any 1 s window, `max_tokens_60s` the most
    tokens accepted in any 60 s window (model only). `series` holds one row per second since the
    provider started (or was reset): `[second, requests, accepted, rejected, tokens]`.
    """

    requests: int = 0
    accepted: int = 0
    rejected: int = 0  # answered 429
    errors: int = 0  # answered another 4xx (malformed request)
    in_flight: int = 0
    max_in_flight: int = 0
    max_accepted_1s: int = 0
    distinct_keys: int = 0  # distinct Idempotency-Keys among accepted requests
    duplicates: int = 0  # accepted requests whose key had been accepted before
    tokens: int = 0
    max_tokens_60s: int = 0
    first_at: float | None = None  # seconds since start (or reset) of the first and the last request
    last_at: float | None = None
    series: tuple[tuple[int, int, int, int, int], ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict (what `GET /stats` answers)."""
        data = asdict(self)
        data["series"] = [list(row) for row in self.series]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderStats:
        """Back from `as_json` (e.g. a subprocess's `GET /stats`)."""
        values = dict(data)
        values["series"] = tuple(tuple(row) for row in values.get("series", ()))
        return cls(**values)


@dataclass
class _Counters:
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_accepted_1s: int = 0
    keys: set[str] = field(default_factory=set)
    duplicates: int = 0
    tokens: int = 0
    max_tokens_60s: int = 0
    first_at: float | None = None
    last_at: float | None = None
    series: dict[int, list[int]] = field(default_factory=dict)


class Provider:
    """The HTTP server, the counters and the thread; subclasses decide each answer (`respond`)."""

    kind = "provider"

    def __init__(self, *, latency: float, host: str = "127.0.0.1", port: int = 0) -> None:
        self.latency = latency
        self._host = host
        self._port = port
        self._cond = threading.Condition()
        self._c = _Counters()
        self._accept_times: deque[float] = deque()  # accepted in the last second (max_accepted_1s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._bound: int | None = None
        self._held = False  # hold(): accepted requests wait for release() after their latency
        self._released: asyncio.Event | None = None

    # -- what subclasses implement ---------------------------------------------------------

    async def respond(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """The answer to one POST (count it with `_admit` / `_reject`)."""
        raise NotImplementedError

    def _reset_limits(self) -> None:
        """Forget the sliding windows (on reset)."""

    # -- counters --------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self._c.started

    def _row(self, now: float) -> list[int]:
        second = int(now)
        row = self._c.series.get(second)
        if row is None:
            row = self._c.series[second] = [0, 0, 0, 0]
        return row

    def _arrived(self) -> float:
        """Count a POST and return its time (seconds since start)."""
        now = self._now()
        with self._cond:
            c = self._c
            c.requests += 1
            c.first_at = now if c.first_at is None else c.first_at
            c.last_at = now
            self._row(now)[0] += 1
            self._cond.notify_all()
        return now

    def _admit(self, now: float, key: str | None, tokens: int = 0) -> None:
        """Count an accepted request (the caller decided it is within the limits)."""
        with self._cond:
            c = self._c
            c.accepted += 1
            c.tokens += tokens
            row = self._row(now)
            row[1] += 1
            row[3] += tokens
            times = self._accept_times
            times.append(now)
            while times and times[0] <= now - 1.0:
                times.popleft()
            c.max_accepted_1s = max(c.max_accepted_1s, len(times))
            if key is not None:
                if key in c.keys:
                    c.duplicates += 1
                else:
                    c.keys.add(key)
            self._cond.notify_all()

    def _reject(self, now: float) -> None:
        with self._cond:
            self._c.rejected += 1
            self._row(now)[2] += 1
            self._cond.notify_all()

    def _error(self) -> None:
        with self._cond:
            self._c.errors += 1
            self._cond.notify_all()

    def _enter(self) -> None:
        with self._cond:
            self._c.in_flight += 1
            self._c.max_in_flight = max(self._c.max_in_flight, self._c.in_flight)

    def _leave(self) -> None:
        with self._cond:
            self._c.in_flight -= 1
            self._cond.notify_all()

    def _stats_locked(self) -> ProviderStats:
        c = self._c
        series = tuple((s, row[0], row[1], row[2], row[3]) for s, row in sorted(c.series.items()))
        return ProviderStats(
            requests=c.requests,
            accepted=c.accepted,
            rejected=c.rejected,
            errors=c.errors,
            in_flight=c.in_flight,
            max_in_flight=c.max_in_flight,
            max_accepted_1s=c.max_accepted_1s,
            distinct_keys=len(c.keys),
            duplicates=c.duplicates,
            tokens=c.tokens,
            max_tokens_60s=c.max_tokens_60s,
            first_at=c.first_at,
            last_at=c.last_at,
            series=series,
        )

    def stats(self) -> ProviderStats:
        """The counters now (thread-safe)."""
        with self._cond:
            return self._stats_locked()

    def reset(self) -> None:
        """Zero the counters and the limits' windows (requests in flight still finish)."""
        with self._cond:
            in_flight = self._c.in_flight
            self._c = _Counters(in_flight=in_flight, max_in_flight=in_flight)
            self._accept_times.clear()
            self._reset_limits()
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[ProviderStats], bool], timeout: float = 10.0) -> ProviderStats:
        """Block until `predicate(stats)` holds (woken by every change); TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._stats_locked()), timeout):
                raise TimeoutError(f"{self.kind} provider: condition not met within {timeout}s: {self._stats_locked()}")
            return self._stats_locked()

    async def wait_for_async(self, predicate: Callable[[ProviderStats], bool], timeout: float = 10.0) -> ProviderStats:
        """`wait_for` from a coroutine, without blocking its event loop."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    def hold(self) -> None:
        """From now on, accepted requests are answered only after `release()` (to pile them up in flight)."""
        self._held = True

    def release(self) -> None:
        """Answer the held requests (after their latency) and stop holding."""
        self._held = False
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.set)

    async def _pause(self) -> None:
        """The latency, then wait while held (a request that saw `_held` is woken by release's set)."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if self._held and self._released is not None:
            self._released.clear()
            await self._released.wait()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the provider must be started)."""
        if self._bound is None:
            raise RuntimeError(f"{self.kind} provider is not started")
        return self._bound

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321`."""
        return f"http://{self._host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """What the pipeline is configured with (PIPELINE_MAILER_URL / PIPELINE_LLM_URL)."""
        return self.url

    # -- serving ---------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(4096)
        sock.setblocking(False)
        self._bound = int(sock.getsockname()[1])
        return sock

    async def serve(self, sock: socket.socket | None = None) -> asyncio.Server:
        """Start serving on the running loop (binds now unless given a socket)."""
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self._server = await self._loop.create_server(lambda: _Connection(self), sock=sock or self._bind())
        return self._server

    async def aclose(self) -> None:
        """Stop accepting, cut in-flight requests short (their connections close unanswered)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def start(self) -> Self:
        """Serve from a daemon thread on its own event loop; returns once the port is bound."""
        if self._thread is not None:
            return self
        sock = self._bind()
        ready = threading.Event()
        loop = _new_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.serve(sock))
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.aclose())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"{self.kind}-provider", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Stop the thread's loop and free the port."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        route = path.split("?", 1)[0]
        if method == "GET" and route == "/stats":
            return Reply(200, self.stats().as_json())
        if method == "POST" and route == "/stats/reset":
            self.reset()
            return Reply(200, {"reset": True})
        if method == "GET" and route == "/health":
            return Reply(200, {"status": "ok"})
        if method != "POST":
            return Reply(404, {"error": f"no {method} {route}"})
        self._enter()
        try:
            return await self.respond(route, headers, body)
        finally:
            self._leave()

    def _retry_header(self, value: RetryAfter, default: Callable[[], str]) -> tuple[tuple[str, str], ...]:
        text = value() if callable(value) else (value if value is not None else default())
        return (("Retry-After", text),) if text else ()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests parsed by Content-Length, answered one at a time, kept alive."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider
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
            if len(self._buffer) > _MAX_HEAD:
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
        if length > _MAX_BODY:
            self._send(Reply(413, {"error": "body too large"}), close=True)
            return
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        close = headers.get("connection", "").lower() == "close"
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._answer(method, target, headers, body, close))
        self._provider._tasks.add(task)
        task.add_done_callback(self._provider._tasks.discard)

    async def _answer(self, method: str, target: str, headers: dict[str, str], body: bytes, close: bool) -> None:
        try:
            reply = await self._provider._dispatch(method, target, headers, body)
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
        head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
        head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(payload)}")
        head.extend(f"{name}: {value}" for name, value in reply.headers)
        if close:
            head.append("Connection: close")
        self._transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        if close:
            self._transport.close()


class MailProvider(Provider):
    """An e-mail API: 200 `{"id": ...}` after `latency`; 429 + Retry-After beyond `limit` a `window`."""

    kind = "mail"

    def __init__(
        self,
        *,
        latency: float = 0.1,
        limit: int | None = None,
        window: float = 1.0,
        retry_after: RetryAfter = "1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(latency=latency, host=host, port=port)
        self.limit = limit
        self.window = window
        self.retry_after = retry_after
        self._window: deque[float] = deque()  # accepted requests' arrival times, within `window`

    @property
    def endpoint(self) -> str:
        """`<url>/send`: PIPELINE_MAILER_URL."""
        return self.url + "/send"

    def _reset_limits(self) -> None:
        self._window.clear()

    async def respond(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        now = self._arrived()
        try:
            mail = json.loads(body)
        except ValueError:
            mail = None
        if not isinstance(mail, dict) or "to" not in mail:
            self._error()
            return Reply(400, {"error": "expected a JSON object with `to`"})
        key = headers.get("idempotency-key")
        with self._cond:  # the window and the counters move together (reset() comes from other threads)
            if self.limit is not None:
                window = self._window
                while window and window[0] <= now - self.window:
                    window.popleft()
                if len(window) >= self.limit:
                    self._reject(now)
                    return Reply(429, {"error": "rate limited"}, self._retry_header(self.retry_after, lambda: "1"))
                window.append(now)
            self._admit(now, key)
            number = self._c.accepted
        await self._pause()
        return Reply(200, {"id": f"mail-{number}"})


class ModelProvider(Provider):
    """An OpenAI-compatible `POST /v1/chat/completions`: deterministic usage, a tokens-per-minute limit."""

    kind = "model"

    def __init__(
        self,
        *,
        latency: float = 1.0,
        tokens_per_minute: int | None = None,
        completion_tokens: int = 50,
        retry_after: RetryAfter = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(latency=latency, host=host, port=port)
        self.tokens_per_minute = tokens_per_minute
        self.completion_tokens = completion_tokens
        self.retry_after = retry_after  # None: the seconds until the window has room for the request
        self._window: deque[tuple[float, int]] = deque()
        self._window_tokens = 0

    @property
    def endpoint(self) -> str:
        """`<url>/v1`: PIPELINE_LLM_URL."""
        return self.url + "/v1"

    def _reset_limits(self) -> None:
        self._window.clear()
        self._window_tokens = 0

    @staticmethod
    def prompt_tokens(messages: Any) -> int:
        """ceil(characters / 4) over the messages' text contents."""
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        return math.ceil(chars / 4)

    def _room_in(self, now: float, tokens: int) -> float:
        """Seconds until the 60 s window has room for `tokens` more."""
        assert self.tokens_per_minute is not None
        used = self._window_tokens
        for at, spent in self._window:
            used -= spent
            if used + tokens <= self.tokens_per_minute:
                return max(at + 60.0 - now, 0.0)
        return 60.0

    async def respond(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return Reply(404, {"error": {"message": f"no POST {path}", "type": "invalid_request_error"}})
        now = self._arrived()
        try:
            request = json.loads(body)
            messages = request["messages"]
            prompt = self.prompt_tokens(messages)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._error()
            return Reply(400, {"error": {"message": "expected {model, messages}", "type": "invalid_request_error"}})
        tokens = prompt + self.completion_tokens
        with self._cond:  # the window and the counters move together (reset() comes from other threads)
            if self.tokens_per_minute is not None:
                window = self._window
                while window and window[0][0] <= now - 60.0:
                    self._window_tokens -= window.popleft()[1]
                if self._window_tokens + tokens > self.tokens_per_minute:
                    self._reject(now)
                    wait = self._room_in(now, tokens)
                    retry = self._retry_header(self.retry_after, lambda: str(max(1, math.ceil(wait))))
                    error = {"message": "tokens per minute exceeded", "type": "tokens", "code": "rate_limit_exceeded"}
                    return Reply(429, {"error": error}, retry)
                window.append((now, tokens))
                self._window_tokens += tokens
                self._c.max_tokens_60s = max(self._c.max_tokens_60s, self._window_tokens)
            self._admit(now, headers.get("idempotency-key"), tokens)
            number = self._c.accepted
        await self._pause()
        usage = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens, "total_tokens": tokens}
        message = {"role": "assistant", "content": f"simulated completion of {self.completion_tokens} tokens"}
        return Reply(
            200,
            {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "model": request.get("model", "simulated") if isinstance(request, dict) else "simulated",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            },
        )


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (as the worker's), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _retry_after_option(raw: str) -> RetryAfter:
    """`date+N`: an HTTP date N seconds ahead at each answer; `auto`: computed (model); else verbatim."""
    if raw.startswith("date+"):
        seconds = float(raw.removeprefix("date+"))
        return lambda: http_date(seconds)
    return None if raw == "auto" else raw


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.providers mail|model [--port P] [--latency S] [--limit N | --tpm N] ...`."""
    parser = argparse.ArgumentParser(prog="python -m tests.providers", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("kind", choices=("mail", "model"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=None, help="seconds (mail 0.1, model 1.0)")
    parser.add_argument("--limit", type=int, default=None, help="mail: accepted requests per window")
    parser.add_argument("--window", type=float, default=1.0, help="mail: the limit's window in seconds")
    parser.add_argument("--tpm", type=int, default=None, help="model: tokens per minute")
    parser.add_argument("--completion-tokens", type=int, default=50)
    parser.add_argument("--retry-after", default=None, help="verbatim, `date+N` or `auto` (model's default)")
    args = parser.parse_args(argv)
    provider: Provider
    if args.kind == "mail":
        retry = _retry_after_option(args.retry_after) if args.retry_after is not None else "1"
        latency = 0.1 if args.latency is None else args.latency
        provider = MailProvider(
            latency=latency, limit=args.limit, window=args.window, retry_after=retry, host=args.host, port=args.port
        )
    else:
        retry = _retry_after_option(args.retry_after) if args.retry_after is not None else None
        provider = ModelProvider(
            latency=1.0 if args.latency is None else args.latency,
            tokens_per_minute=args.tpm,
            completion_tokens=args.completion_tokens,
            retry_after=retry,
            host=args.host,
            port=args.port,
        )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await provider.serve()
        print(provider.url, flush=True)
        await stop.wait()
        await provider.aclose()

    loop = _new_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


if __name__ == "__main__":
    main(sys.argv[1:])
