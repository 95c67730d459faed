"""PIPELINE_LIMITS and provider pushback with real workers against a local mail provider that counts.

The provider (tests/providers.py) counts calls in flight, calls accepted in any second, 429s and
duplicate Idempotency-Keys; the workers are real `faststream run` processes sharing one store.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from streams.core import names
from tests.connected.conftest import ROOT, RabbitProbe, RedisProbe, clean_slate
from tests.connected.harness import Workers, email
from tests.providers import MailProvider

LIMITS = json.dumps({"mailer": {"requests_per_second": 20, "max_concurrency": 3}})


def handled(log: str) -> int:
    """E-mails a worker's JSON log says it handled."""
    count = 0
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        count += isinstance(entry, dict) and entry.get("event") == "handled"
    return count


async def test_two_workers_together_stay_within_the_providers_limits(
    services: None, scratch_dir: Path, rabbit_probe: RabbitProbe, redis_probe: RedisProbe
) -> None:
    """Two workers, 20 calls a second and 3 in flight allowed: 40 e-mails on both brokers all go out,
    never more than 3 at once nor (but for one on a window's edge) 20 in a second, each once."""
    await clean_slate()
    with MailProvider(latency=0.1) as provider:
        pool = Workers(scratch_dir, provider.endpoint)
        try:
            await asyncio.gather(pool.start(PIPELINE_LIMITS=LIMITS), pool.start(PIPELINE_LIMITS=LIMITS))
            for i in range(20):
                await rabbit_probe.publish(names.EMAIL_QUEUE, email(f"rabbit {i}"))
                await redis_probe.publish(names.EMAIL_STREAM, email(f"redis {i}"))
            stats = await provider.wait_for_async(lambda s: s.distinct_keys >= 40, timeout=60)
            assert stats.max_in_flight <= 3
            assert stats.max_accepted_1s <= 21  # unshared, two workers would send up to 40 in a second
            assert (stats.rejected, stats.duplicates) == (0, 0)
            assert all(handled(w.log()) > 0 for w in pool.started), "both workers took part"
        finally:
            pool.stop_all()


async def test_pushback_slows_every_worker_and_uses_no_attempt(
    services: None, scratch_dir: Path, rabbit_probe: RabbitProbe
) -> None:
    """A provider that takes 5 a second and answers 429 + Retry-After: 1 beyond: with no PIPELINE_LIMITS,
    two workers deliver all 20 e-mails, each once, nothing dead-lettered, every wait on the first attempt."""
    await clean_slate()
    with MailProvider(latency=0.05, limit=5, retry_after="1") as provider:
        pool = Workers(scratch_dir, provider.endpoint)
        try:
            await asyncio.gather(pool.start(), pool.start())
            for i in range(20):
                await rabbit_probe.publish(names.EMAIL_QUEUE, email(f"burst {i}"))
            stats = await provider.wait_for_async(lambda s: s.distinct_keys >= 20, timeout=90)
            assert stats.rejected > 0, "the burst met the provider's limit"
            assert stats.duplicates == 0
            assert await pool.rows("SELECT id FROM dead_letters") == []
            waits = await pool.rows("SELECT data FROM events WHERE type = 'message.retry_scheduled'")
            assert waits, "the 429s were recorded as waits"
            assert {(json.loads(data) if isinstance(data, str) else data)["attempt"] for (data,) in waits} == {1}
            async with httpx2.AsyncClient(timeout=5) as http:
                counted = [(await http.get(w.base_url + "/metrics")).text for w in pool.started]
            assert any('pipeline_throttled_total{dependency="mailer"}' in text for text in counted)
        finally:
            pool.stop_all()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{not json", "not valid JSON"),
        ('{"crm": {"requests_per_second": 5}}', "unknown dependency 'crm'"),
        ('{"mailer": {"requests_per_second": -1}}', "greater than 0"),
        ('{"mailer": {"max_concurrency": 0}}', "greater than or equal to 1"),
    ],
)
def test_bad_limits_refuse_to_start_naming_the_variable(services: None, value: str, says: str) -> None:
    """A worker given a bad PIPELINE_LIMITS exits at once with one line naming the variable and the fault."""
    env = {"PIPELINE_LIMITS": value, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "faststream", "run", "streams.app:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "PIPELINE_LIMITS" in output
    assert says in output
    assert "Traceback" not in output
