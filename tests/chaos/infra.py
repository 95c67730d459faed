"""Chaos infrastructure: a timeline of what happened, a supervisor restarting dead workers, a fresh store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from streams.eventstore import schema
from tests.connected.conftest import Worker, start_worker

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


class Timeline:
    """Every fault, death, restart and phase, with its time since the start of the run."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.entries: list[dict[str, Any]] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def log(self, what: str, **details: Any) -> dict[str, Any]:
        entry = {"t": self.now(), "what": what, **details}
        self.entries.append(entry)
        print(f"[chaos {entry['t']:8.2f}s] {what} {json.dumps(details, default=str) if details else ''}", flush=True)
        return entry

    def of(self, what: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["what"] == what]


@dataclass
class Slot:
    """One supervised worker position: its current process and its history."""

    index: int
    env: dict[str, str]
    worker: Worker | None = None
    incarnation: int = 0
    deaths: list[dict[str, Any]] = field(default_factory=list)
    # A one-shot crash point: armed for the next incarnation only, which is clean again once it died.
    armed_next: dict[str, str] | None = None
    armed_now: dict[str, str] | None = None
    expected_exit: bool = False
    log_offset: int = 0  # fork-server mode: how far its log has been read for worker deaths


def child_pids(pid: int) -> list[int]:
    """The children of process `pid` (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


class Supervisor:
    """Keeps `size` workers alive: a worker that dies is restarted `restart_delay` s later, forever.

    With `forkserver`, each slot runs `python -m streams.ops.forkserver`, which replaces its own dead
    worker (a forked child) at once; the supervisor then reads the deaths from its log, kills the
    child rather than the parent, and restarts only a parent that exited.
    """

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str],
        size: int,
        timeline: Timeline,
        rng: random.Random,
        restart_delay: tuple[float, float] = (0.2, 0.5),
        *,
        forkserver: bool = False,
    ) -> None:
        self.forkserver = forkserver
        self.tmp = tmp
        self.timeline = timeline
        self.rng = rng
        self.restart_delay = restart_delay
        self.slots = [Slot(i, dict(env)) for i in range(size)]
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0
        self.all_workers: list[Worker] = []

    def _spawn(self, slot: Slot) -> Worker:
        slot.incarnation += 1
        env = {**slot.env, **(slot.armed_next or {})}
        slot.armed_now, slot.armed_next = slot.armed_next, None
        worker = start_worker(self.tmp, env, name=f"w{slot.index}-{slot.incarnation:04d}", forkserver=self.forkserver)
        slot.worker = worker
        slot.log_offset = 0
        self.all_workers.append(worker)
        return worker

    async def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._task = asyncio.create_task(self._watch(), name="chaos-supervisor")

    def _forked_deaths(self, slot: Slot) -> None:
        """Record the worker deaths the slot's fork server logged since the last look."""
        assert slot.worker is not None
        try:
            with slot.worker.log_path.open("rb") as f:
                f.seek(slot.log_offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        slot.log_offset += end
        for line in chunk[:end].splitlines():
            if b"worker died; forking a new one" not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            death = self.timeline.log(
                "worker died",
                slot=slot.index,
                incarnation=slot.incarnation,
                code=record.get("code"),
                pid=record.get("pid"),
                armed=slot.armed_now,
            )
            slot.deaths.append(death)
            slot.armed_now = None
            self.restarts += 1

    async def _watch(self) -> None:
        while True:
            for slot in self.slots:
                worker = slot.worker
                if worker is None or slot.expected_exit:
                    continue
                if self.forkserver:
                    self._forked_deaths(slot)
                code = worker.proc.poll()
                if code is None:
                    continue
                death = self.timeline.log(
                    "worker died", slot=slot.index, incarnation=slot.incarnation, code=code, armed=slot.armed_now
                )
                slot.deaths.append(death)
                slot.armed_now = None
                await asyncio.sleep(self.rng.uniform(*self.restart_delay))
                self._spawn(slot)
                self.restarts += 1
            await asyncio.sleep(0.05)

    def _target(self, slot: Slot) -> int | None:
        """The pid doing the slot's work: the process itself, or the fork server's child."""
        if slot.worker is None or slot.worker.proc.poll() is not None:
            return None
        if not self.forkserver:
            return slot.worker.proc.pid
        children = child_pids(slot.worker.proc.pid)
        return children[0] if children else None

    def alive(self) -> list[Slot]:
        return [s for s in self.slots if self._target(s) is not None]

    def kill(self, slot: Slot, why: str) -> None:
        """SIGKILL the slot's worker (the supervisor, or its fork server, replaces it)."""
        pid = self._target(slot)
        if pid is not None:
            self.timeline.log("SIGKILL", slot=slot.index, incarnation=slot.incarnation, pid=pid, why=why)
            os.kill(pid, signal.SIGKILL)

    def arm(self, slot: Slot, env: dict[str, str], why: str) -> None:
        """Restart `slot` with `env` laid over its own for one incarnation (it ends at its crash)."""
        slot.armed_next = env
        self.timeline.log("arm one-shot fault", slot=slot.index, why=why, env=env)
        if slot.worker is not None and slot.worker.proc.poll() is None:
            slot.worker.proc.send_signal(signal.SIGTERM)  # graceful: it finishes what it holds

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for slot in self.slots:
            slot.expected_exit = True
        await asyncio.gather(*(asyncio.to_thread(s.worker.stop, signal.SIGTERM, 30) for s in self.slots if s.worker))

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.all_workers if w.log_path.exists())


@contextlib.asynccontextmanager
async def fresh_postgres(prefix: str = "chaos") -> AsyncIterator[str]:
    """A new PostgreSQL database at the current schema, dropped afterwards; yields its asyncpg URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        await schema.upgrade(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def plain_pg(url: str) -> str:
    """The asyncpg DSN of a SQLAlchemy URL."""
    return url.replace("postgresql+asyncpg://", "postgresql://")
