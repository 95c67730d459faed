"""`python -m streams.ops.forkserver`: a worker that dies is replaced by a fork of the warm parent."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx2
import pytest

from streams.core import names
from tests.chaos.infra import child_pids
from tests.connected.conftest import RabbitProbe, Worker, clean_slate, start_worker, wait_ready, wait_until
from tests.connected.harness import email


def _records(worker: Worker) -> list[dict[str, object]]:
    """The worker's JSON log lines."""
    return [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]


def _startups(worker: Worker) -> list[dict[str, object]]:
    """The start-up lines of each forked worker (they name the consumer)."""
    return [r for r in _records(worker) if "consumer" in r and "settings" in r]


async def _child(worker: Worker) -> int:
    async def one() -> int | None:
        children = child_pids(worker.proc.pid)
        return children[0] if children else None

    pid: int = await wait_until(one, 30)
    return pid


async def test_a_killed_worker_is_forked_again_and_serves(
    services: None, tmp_path: Path, rabbit_probe: RabbitProbe
) -> None:
    await clean_slate()  # no earlier test's leftovers queued in front of the message below
    worker = start_worker(tmp_path, {"PIPELINE_LOG_FORMAT": "json"}, forkserver=True)
    try:
        await wait_ready(worker)
        first = await _child(worker)
        signal_sent = time.monotonic()
        os.kill(first, signal.SIGKILL)

        async def replaced() -> bool:
            children = child_pids(worker.proc.pid)
            if not children or children[0] == first:
                return False
            try:
                async with httpx2.AsyncClient() as client:
                    return (await client.get(worker.base_url + "/health/ready", timeout=2)).status_code == 200
            except httpx2.HTTPError:
                return False

        await wait_until(replaced, 60, interval=0.05)
        print(f"ready again {time.monotonic() - signal_sent:.2f} s after the SIGKILL")
        assert worker.proc.poll() is None, "the parent lives on"
        (died,) = [r for r in _records(worker) if r.get("event") == "worker died; forking a new one"]
        assert died["signal"] == "SIGKILL"
        assert died["started"] is True, "it had been consuming: replaced at once"

        mid = await rabbit_probe.publish("email", email())
        await rabbit_probe.wait_event(names.EMAIL_SENT, mid, timeout=30)

        consumers = [str(s["consumer"]) for s in _startups(worker)]
        assert len(consumers) == 2
        assert consumers[0] != consumers[1], "each forked worker is its own consumer"
        second = child_pids(worker.proc.pid)[0]
        assert str(first) in consumers[0]
        assert str(second) in consumers[1]
    finally:
        code = worker.stop(signal.SIGTERM, timeout=40)
    assert code == 0, "SIGTERM reaches the worker, which stops cleanly, and the parent exits with it"
    assert "worker stopped" in worker.log()


async def test_sigterm_stops_worker_and_parent(services: None, tmp_path: Path) -> None:
    worker = start_worker(tmp_path, {"PIPELINE_LOG_FORMAT": "json"}, forkserver=True)
    await wait_ready(worker)
    child = await _child(worker)
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.proc.wait(40)
    assert code == 0
    with pytest.raises(ProcessLookupError):  # no worker left behind
        os.kill(child, 0)
    assert "worker stopped" in worker.log()
