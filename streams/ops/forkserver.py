"""Warm restarts: start-up is paid once, and a worker that dies is replaced by a fork at once.

`python -m streams.ops.forkserver [--host H] [--port P]` imports the application once (every heavy
library: FastStream, SQLAlchemy, Alembic, Pydantic models), then forks the worker from that warm
parent and runs it as `faststream run streams.app:app --host H --port P` would. When the worker
dies (a poison message's SIGKILL, an OOM kill, a crash), the parent forks a new one at once: no
interpreter start and no imports, the bulk of a cold start. Under a crash loop the pipeline keeps
its throughput instead of spending it on restarts. What the dead worker held is redelivered by
the brokers, as after any crash.

SIGTERM and SIGINT are passed to the worker, which shuts down gracefully; the parent then exits
with the worker's exit code. A worker that died after it started consuming is replaced at once; one
that could not start (a broker down, the database refusing it) is retried after a delay doubling
from 0.1 s up to 5 s, so a start-up that cannot succeed does not spin.

The parent starts no thread and opens no connection before forking: every socket, pool, event
loop and random generator is the child's own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, Final, NoReturn

import anyio

from streams.core.logging import configure_logging, get_logger

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0


def serve(app: Any, host: str, port: int) -> int:
    """Run the ASGI FastStream app in this process, on uvloop when installed (as `faststream run`)."""
    options: dict[str, Any] = {}
    if uvloop is not None:
        options["loop_factory"] = uvloop.new_event_loop
    anyio.run(app.run, logging.INFO, {"host": host, "port": str(port)}, backend_options=options)
    return 0


def next_backoff(started: bool, previous: float) -> float:
    """Seconds to wait before the next fork: none after a worker that started consuming."""
    if started:
        return 0.0
    return min(max(previous * 2, FIRST_BACKOFF), MAX_BACKOFF)


def run_worker(module: Any, host: str, port: int, ready_fd: int) -> NoReturn:
    """The forked worker: its own signals and random state, the app served, then exit."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    random.seed()
    module.pipeline.rng.seed()
    module.READY_CALLBACKS.append(lambda: os.write(ready_fd, b"r"))
    try:
        code = serve(module.app, host, port)
    except BaseException:  # reported, then the parent decides
        logging.getLogger("pipeline.forkserver").exception("worker failed")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.ops.forkserver", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container's worker listens on all interfaces
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    module: Any = importlib.import_module("streams.app")  # the warm part: every import, no I/O

    configure_logging(module.settings.log_level, module.settings.log_format)
    log = get_logger("pipeline.forkserver")
    if threading.active_count() != 1:
        log.warning("threads started before fork; running the worker in this process instead")
        return serve(module.app, args.host, args.port)

    stopping: int | None = None
    child = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = signum
        if child:
            os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = 0.0
    generation = 0
    while stopping is None:
        generation += 1
        started = time.monotonic()
        ready_r, ready_w = os.pipe()  # the worker writes one byte once it consumes
        child = os.fork()
        if child == 0:
            os.close(ready_r)
            run_worker(module, args.host, args.port, ready_w)
        log.info("worker forked", pid=child, generation=generation)
        os.close(ready_w)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        lived = time.monotonic() - started
        consumed = os.read(ready_r, 1) == b"r"  # the write end is closed: never blocks
        os.close(ready_r)
        if stopping is not None:
            log.info("worker stopped", pid=child, code=code)
            return code if code >= 0 else 0
        backoff = next_backoff(consumed, backoff)
        log.warning(
            "worker died; forking a new one",
            pid=child,
            code=code,
            signal=signal.Signals(-code).name if code < 0 else None,
            lived_seconds=round(lived, 3),
            started=consumed,
            restart_in_seconds=backoff,
        )
        deadline = time.monotonic() + backoff
        while stopping is None and time.monotonic() < deadline:
            time.sleep(min(0.05, deadline - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
