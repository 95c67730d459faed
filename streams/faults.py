"""Fault injection for the chaos and poison tests, switched on only by an environment variable.

With `PIPELINE_FAULT_CRASH_MARKER` set, a command whose bytes contain the marker kills its
worker with SIGKILL before the handler runs: the way a real poison message (a segfaulting
library, an out-of-memory kill) looks to the broker. Unset, this module does nothing.
"""

from __future__ import annotations

import os
import signal

_MARKER = os.environ.get("PIPELINE_FAULT_CRASH_MARKER", "").encode()


def crash_if_marked(body: bytes) -> None:
    """Kill this process at once when the body carries the crash marker."""
    if _MARKER and _MARKER in body:
        os.kill(os.getpid(), signal.SIGKILL)
