"""Counts handled messages inside a contender process and writes what it measured."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import procstat


@dataclass
class Measured:
    """What one contender process reports (times in seconds, `time.monotonic`)."""

    handled: int
    invalid: int
    t_first: float
    t_last: float
    cpu_first: float
    cpu_last: float
    cpu_start: float
    peak_rss_mb: float
    pid: int
    machine_busy: float  # share of all CPUs busy between the first and the last message (0..1)
    capped: bool  # stopped at the time cap before n messages


class Meter:
    """Call `tick()` once per handled message; it answers True at the n-th one (the run is over).

    The clocks are read at the first and the last message, and every 256th for the time cap
    (`max_seconds` after the first message), so the meter costs next to nothing.
    """

    def __init__(self, n: int, max_seconds: float = 0.0) -> None:
        self.n = n
        self.max_seconds = max_seconds
        self.capped = False
        self.finished = False
        self.count = 0
        self.invalid = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.cpu_start = procstat.cpu_seconds()
        self.machine_first = (0.0, 0.0)
        self.machine_last = (0.0, 0.0)
        self.lock = threading.Lock()  # for thread-pool consumers (Dramatiq)

    def tick(self) -> bool:
        """One more message handled; True when it was the last one (later calls change nothing)."""
        if self.finished:
            return False
        self.count += 1
        if self.count == 1:
            self.t_first = time.monotonic()
            self.cpu_first = procstat.cpu_seconds()
            self.machine_first = procstat.machine_cpu()
        elif self.count & 255 == 0 and self.max_seconds and time.monotonic() - self.t_first >= self.max_seconds:
            self.capped = True
        if self.count == self.n or self.capped:
            self.t_last = time.monotonic()
            self.cpu_last = procstat.cpu_seconds()
            self.machine_last = procstat.machine_cpu()
            self.finished = True
            return True
        return False

    def tick_threadsafe(self) -> bool:
        """`tick()` for consumers that handle messages on several threads."""
        with self.lock:
            return self.tick()

    def result(self) -> Measured:
        """The measurement, once `tick()` said done."""
        return Measured(
            handled=self.count,
            invalid=self.invalid,
            t_first=self.t_first,
            t_last=self.t_last,
            cpu_first=self.cpu_first,
            cpu_last=self.cpu_last,
            cpu_start=self.cpu_start,
            peak_rss_mb=procstat.peak_rss_mb(),
            pid=os.getpid(),
            machine_busy=procstat.busy_fraction(self.machine_first, self.machine_last),
            capped=self.capped,
        )


def write(path: Path, measured: Measured) -> None:
    """Write the measurement where the orchestrator waits for it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(measured)))
    tmp.replace(path)


def read(path: Path) -> Measured:
    """Read a contender's measurement."""
    return Measured(**json.loads(path.read_text()))


def arguments(description: str) -> argparse.ArgumentParser:
    """The command line every contender takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True, help="queue or stream")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--count", type=int, default=100, help="Redis: entries per read")
    parser.add_argument("--group", default="bench")
    parser.add_argument("--threads", type=int, default=8, help="Dramatiq worker threads")
    parser.add_argument("--queue-type", default="quorum")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop this long after the first message")
    parser.add_argument("--sqlite", default="wal", help="hand-rolled contenders: SQLite settings, wal | default")
    return parser
