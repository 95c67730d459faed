"""One shape for the worker's background loops: `tick()` every `interval` seconds until stopped."""

from __future__ import annotations

import asyncio
import contextlib

from streams.logging import get_logger

log = get_logger("pipeline.periodic")


class Periodic:
    """A background loop; a failing tick is logged and the loop goes on."""

    name = "periodic"
    quiet_failures = False  # log failing ticks at debug (for loops whose failure health reports anyway)

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        """One round of work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start ticking in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop ticking (a tick in progress is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - an outage must not end the loop
                emit = log.debug if self.quiet_failures else log.warning
                emit("background loop failed; retrying", loop=self.name, error=repr(exc))
            await asyncio.sleep(self.interval)
