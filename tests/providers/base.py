"""`Provider`: the HTTP server, the counters, the thread or the loop it runs on; subclasses decide each answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from types import TracebackType
from typing import Self

from tests.providers.counters import Counters, ProviderStats
from tests.providers.http import HttpConnection, Reply

RetryAfter = str | Callable[[], str] | None


def http_date(seconds_from_now: float = 1.0) -> str:
    """An HTTP date (`Retry-After`'s other form) that many seconds from now."""
    return formatdate(time.time() + seconds_from_now, usegmt=True)


class Provider:
    """The HTTP server, the counters and the thread; subclasses decide each answer (`respond`)."""

    kind = "provider"

    def __init__(self, *, latency: float, host: str = "127.0.0.1", port: int = 0) -> None:
        self.latency = latency
        self._host = host
        self._port = port
        self._cond = threading.Condition()
        self._c = Counters()
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
            self._c = Counters(in_flight=in_flight, max_in_flight=in_flight)
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
        self._server = await self._loop.create_server(
            lambda: HttpConnection(self._dispatch, self._tasks), sock=sock or self._bind()
        )
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
        loop = new_loop()
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


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (as the worker's), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
