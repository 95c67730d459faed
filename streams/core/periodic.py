"""One shape for the worker's background loops: `tick()` every `interval` seconds until stopped."""

from __future__ import annotations

import asyncio
import contextlib

from streams.core.logging import get_logger

log = get_logger("pipeline.periodic")


class Periodic:
    """A background loop; a failing tick is logged and the loop goes on."""

    name = "periodic"
    quiet_failures = False  # log failing ticks at debug (for loops whose failure health reports anyway)

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def tick(self) -> None:
        """One round of work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start ticking in the background."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop ticking (a tick in progress is cancelled)."""
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - an outage must not end the loop
                emit = log.debug if self.quiet_failures else log.warning
                emit("background loop failed; retrying", loop=self.name, error=repr(exc))
            await asyncio.sleep(self.interval)


async def cancel_and_wait(task: asyncio.Task[None], grace: float = 5.0) -> None:
    """Cancel a background task and wait for it to end, at most `grace` s.

    A library call that turns the cancellation into an ordinary error lets a loop that retries
    on errors go on; shutdown must not wait for it forever (the loops also check a stop flag).
    """
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        log.warning("background task did not end when cancelled; left behind", task=task.get_name())
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()  # retrieved, so no "exception never retrieved" warning
