"""Process-level safety and faults: the shutdown watchdog, and one-shot crash points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from streams.ops.watchdog import EXIT_CODE

STUCK = """
import asyncio
from streams.ops.watchdog import ShutdownWatchdog

async def never_released():
    await asyncio.Event().wait()

async def main():
    dog = ShutdownWatchdog(deadline=0.5)
    dog.arm()
    await never_released()

asyncio.run(main())
"""

DONE = """
import asyncio
from streams.ops.watchdog import ShutdownWatchdog

async def main():
    dog = ShutdownWatchdog(deadline=0.5)
    dog.arm()
    await asyncio.sleep(0.01)
    dog.disarm()
    await asyncio.sleep(1.0)

asyncio.run(main())
"""


def test_a_stuck_shutdown_exits_with_the_stacks_of_its_tasks() -> None:
    proc = subprocess.run([sys.executable, "-c", STUCK], check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_CODE
    output = proc.stdout + proc.stderr
    assert "shutdown did not finish in time" in output
    assert "never_released" in output, "the stuck task's stack is in the log"


def test_a_shutdown_that_finishes_is_left_alone() -> None:
    proc = subprocess.run([sys.executable, "-c", DONE], check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


CRASH = "from streams.core import faults; faults.crash_at('after_handler', b'xx MARK xx'); print('survived')"


def test_a_one_shot_crash_point_fires_once_across_processes(tmp_path: Path) -> None:
    """With PIPELINE_FAULT_CRASH_ONCE, the first process dies at the point, the next one goes on."""
    env = {
        **os.environ,
        "PIPELINE_FAULT_CRASH_MARKER": "MARK",
        "PIPELINE_FAULT_CRASH_POINTS": "after_handler",
        "PIPELINE_FAULT_CRASH_ONCE": str(tmp_path / "fired"),
    }
    first = subprocess.run([sys.executable, "-c", CRASH], env=env, check=False, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", CRASH], env=env, check=False, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0
    assert second.stdout.strip() == "survived"


def test_forkserver_backs_off_only_while_the_worker_cannot_start() -> None:
    from streams.ops.forkserver import MAX_BACKOFF, next_backoff

    assert next_backoff(True, 4.0) == 0.0, "a worker that consumed and died is replaced at once"
    delays = []
    delay = 0.0
    for _ in range(8):
        delay = next_backoff(False, delay)
        delays.append(delay)
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert delays[-1] == MAX_BACKOFF
