"""A real local HTTP server for tests: records every request, answers from a script.

No mocking of httpx: adapters talk to a stdlib `ThreadingHTTPServer` bound to 127.0.0.1 on a free
port, served from a daemon thread. Each request is recorded (method, path, lower-cased headers,
raw body, parsed JSON) and answered with the next scripted response; once the script runs out,
every request gets `default`. Bare ints in a script are statuses, so "503 twice then 200" is
`RecordingServer(503, 503, ScriptedResponse(200, {"id": "m-1"}))`.

    with RecordingServer(503, 503, 200) as server:
        ...  # point the adapter at server.url
        assert [r.path for r in server.requests] == ["/send"] * 3

A response with `delay` sleeps before answering (to provoke client timeouts); stopping the server
cuts such sleeps short. Reading `requests` or calling `wait_for_requests` is thread-safe.
Request bodies are read by Content-Length (what httpx sends for `json=`); chunked bodies are not.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, cast

__all__ = ("RecordedRequest", "RecordingServer", "ScriptedResponse", "closed_port_url")


@dataclass(frozen=True, slots=True)
class ScriptedResponse:
    """One answer: a status, a JSON body (or `raw` bytes sent verbatim), extra headers, a delay."""

    status: int = 200
    body: Any = field(default_factory=dict)
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None

    def encode(self) -> tuple[bytes, str]:
        """The bytes to send and their content type."""
        if self.raw is not None:
            return self.raw, self.headers.get("Content-Type", "application/octet-stream")
        return json.dumps(self.body).encode(), "application/json"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server saw it; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError when it is not JSON)."""
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 drops bursts of concurrent connects (client timeouts)

    def __init__(self, owner: RecordingServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    def _handle(self) -> None:
        owner = cast(_Server, self.server).owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = owner._record(RecordedRequest(self.command, self.path, headers, body))
        if response.delay and owner._stopping.wait(response.delay):
            return  # the server is stopping: drop the connection without answering
        payload, content_type = response.encode()
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                if name.lower() not in {"content-type", "content-length"}:
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (e.g. timed out) before the answer: nothing to tell it

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class RecordingServer:
    """A scripted HTTP server on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(self, *responses: ScriptedResponse | int, default: ScriptedResponse | None = None) -> None:
        self.default = default if default is not None else ScriptedResponse()
        self._script: deque[ScriptedResponse] = deque()
        self._keyed: dict[str, deque[ScriptedResponse]] = {}
        self._requests: list[RecordedRequest] = []
        self._statuses: list[int] = []  # the status each request was answered with, in order
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.script(*responses)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port and serve from a daemon thread."""
        if self._server is None:
            self._stopping.clear()
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut pending delays short and free the port."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the server must be started)."""
        if self._server is None:
            raise RuntimeError("RecordingServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, path: str) -> str:
        """Absolute URL of `path` on this server."""
        return self.url + "/" + path.lstrip("/")

    # -- script and record -----------------------------------------------------------------

    def script(self, *responses: ScriptedResponse | int) -> None:
        """Append answers to the script; an int is a status with an empty JSON object body."""
        with self._changed:
            self._script.extend(r if isinstance(r, ScriptedResponse) else ScriptedResponse(r) for r in responses)

    def script_for(self, key: str, *responses: ScriptedResponse | int) -> None:
        """Answers for requests whose `Idempotency-Key` is `key` (one message), ahead of the shared script."""
        with self._changed:
            queue = self._keyed.setdefault(key, deque())
            queue.extend(r if isinstance(r, ScriptedResponse) else ScriptedResponse(r) for r in responses)

    def requests_for(self, key: str) -> list[RecordedRequest]:
        """The requests that carried `Idempotency-Key: key`, oldest first."""
        with self._changed:
            return [r for r in self._requests if r.headers.get("idempotency-key") == key]

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._changed:
            return list(self._requests)

    def answered(self) -> list[tuple[RecordedRequest, int]]:
        """Each request with the status it was answered with (a dropped answer still counts)."""
        with self._changed:
            return list(zip(self._requests, self._statuses, strict=True))

    @property
    def pending(self) -> int:
        """How many scripted answers are still unused."""
        with self._changed:
            return len(self._script)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least `count` requests arrived; raise TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"expected {count} requests, got {len(self._requests)} in {timeout}s")
            return list(self._requests)

    def _record(self, request: RecordedRequest) -> ScriptedResponse:
        with self._changed:
            self._requests.append(request)
            keyed = self._keyed.get(request.headers.get("idempotency-key", ""))
            if keyed is not None:
                # A keyed message whose script ran out keeps the last answer (e.g. "always 503").
                response = keyed.popleft() if len(keyed) > 1 else keyed[0]
            else:
                response = self._script.popleft() if self._script else self.default
            self._statuses.append(response.status)
            self._changed.notify_all()
            return response


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
