"""Fault injection for the chaos and poison tests, switched on only by environment variables.

With `PIPELINE_FAULT_CRASH_MARKER` set, a message whose bytes contain the marker kills its
worker with SIGKILL at each point named in `PIPELINE_FAULT_CRASH_POINTS` (default
`before_handler`): `before_handler`, `after_handler` (side effect done, nothing committed),
`after_commit` (outcome committed, message not yet acknowledged), `before_publish` (the relay
is about to publish the outcome). It is the way a real poison message or an OOM kill looks to
the broker. With `PIPELINE_FAULT_CRASH_ONCE` set to a file path, only the first crash fires (the
file records it; across processes, e.g. the workers a fork server replaces). With the marker
unset, this module does nothing.
"""

from __future__ import annotations

import os
import signal

_MARKER = os.environ.get("PIPELINE_FAULT_CRASH_MARKER", "").encode()
_POINTS = frozenset(
    p.strip() for p in os.environ.get("PIPELINE_FAULT_CRASH_POINTS", "before_handler").split(",") if p.strip()
)


_ONCE = os.environ.get("PIPELINE_FAULT_CRASH_ONCE", "")


def crash_at(point: str, data: bytes) -> None:
    """Kill this process at once when `point` is armed and `data` carries the crash marker."""
    if _MARKER and point in _POINTS and _MARKER in data:
        if _ONCE:
            try:  # one-shot: the first process to create the file fires, no later one
                os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
