"""The shutdown watchdog: a shutdown stuck on an await exits anyway, saying where it was stuck."""

from __future__ import annotations

import subprocess
import sys

from streams.watchdog import EXIT_CODE

STUCK = """
import asyncio
from streams.watchdog import ShutdownWatchdog

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
from streams.watchdog import ShutdownWatchdog

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
