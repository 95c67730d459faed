"""A hard deadline on shutdown: a worker that cannot finish stopping says why, then exits anyway.

Graceful shutdown waits for in-flight handlers (up to the graceful timeout), flushes the outbox
and closes connections; each step is bounded, but a wait nobody bounded (a driver call that never
returns, a lock never released) would keep a stopped worker alive forever, holding its prefetched
messages. So when shutdown starts, a timer thread is armed; if the process is still there at the
deadline, it writes the stack of every asyncio task and thread to stderr and exits with
`EXIT_CODE`. Nothing is lost by it: what was not acknowledged is redelivered, and the outbox keeps
what was not published.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import os
import sys
import threading
from typing import Final

from streams.core.logging import get_logger

log = get_logger("pipeline.watchdog")

EXIT_CODE: Final = 70  # EX_SOFTWARE


class ShutdownWatchdog:
    """Arm once at the start of shutdown; `disarm` when it completed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._timer: threading.Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self) -> None:
        """Start counting (call from the event loop, when shutdown begins)."""
        if self._timer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._timer = threading.Timer(self.deadline, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        """Shutdown finished in time."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        out = io.StringIO()
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                out.write(f"--- {task.get_name()}\n{await_chain(task)}")
        log.error(
            "shutdown did not finish in time; exiting without it",
            deadline_seconds=self.deadline,
            tasks=out.getvalue()[-20_000:],
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def await_chain(task: asyncio.Task[object]) -> str:
    """Where a task waits: each coroutine down its `await` chain, then what the innermost awaits."""
    lines = []
    awaited: object = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            lines.append(f"  awaiting {awaited!r:.200}")
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "\n".join(lines) + "\n"
