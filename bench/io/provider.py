"""A provider simulator (tests/providers.py) in its own process, its counters read over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx2

from bench import procstat
from bench.config import ROOT
from tests.providers import ProviderStats


class ProviderProcess:
    """`python -m tests.providers ...`: started, its base URL read from its first line, stopped with SIGTERM."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, client: httpx2.AsyncClient) -> None:
        self.proc = proc
        self.url = url
        self._client = client

    @property
    def pid(self) -> int:
        """The provider's process id (its CPU is reported beside the contender's)."""
        return self.proc.pid

    async def stats(self) -> ProviderStats:
        """The counters now (`GET /stats`)."""
        response = await self._client.get(self.url + "/stats")
        response.raise_for_status()
        return ProviderStats.from_json(response.json())

    def cpu_seconds(self) -> float:
        """The provider process's CPU so far."""
        return procstat.total_cpu_seconds([self.pid])


@contextlib.asynccontextmanager
async def provider(kind: str, args: Sequence[str], log_path: Path) -> AsyncIterator[ProviderProcess]:
    """A fresh provider process (fresh counters and windows) for one run."""
    command = [sys.executable, "-m", "tests.providers", kind, *args]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        url = line.decode().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"provider did not start: {line!r} (its stderr: {log_path})")
        async with httpx2.AsyncClient(timeout=10.0, trust_env=False) as client:
            yield ProviderProcess(proc, url, client)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def mail_args(latency: float, limit: int | None, retry_after: str) -> list[str]:
    """The mail provider's command line."""
    args = ["--latency", str(latency), "--retry-after", retry_after]
    return [*args, "--limit", str(limit)] if limit is not None else args


def model_args(latency: float, tokens_per_minute: int | None, completion_tokens: int) -> list[str]:
    """The model provider's command line."""
    args = ["--latency", str(latency), "--completion-tokens", str(completion_tokens)]
    return [*args, "--tpm", str(tokens_per_minute)] if tokens_per_minute is not None else args
