"""The local provider simulators (tests/providers.py): their limits, counters and process form."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx2
import pytest

from tests.providers import MailProvider, ModelProvider, http_date

ROOT = Path(__file__).resolve().parents[2]
MAIL = {"to": "ada@example.com", "subject": "Hi", "body": "Hello.", "template": None}


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    """A client that ignores proxy settings from the environment."""
    async with httpx2.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


async def test_mail_limit_answers_429_with_retry_after_beyond_n_in_the_window(client: httpx2.AsyncClient) -> None:
    """Beyond `limit` accepted requests in the window, the answer is 429 with the configured Retry-After."""
    with MailProvider(latency=0, limit=3, window=60.0) as mail:  # a long window: no request ages out
        answers = [await client.post(mail.endpoint, json=MAIL, headers={"Idempotency-Key": f"k{i}"}) for i in range(5)]

        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        assert answers[0].json()["id"]
        assert [a.headers.get("retry-after") for a in answers[3:]] == ["1", "1"]
        stats = mail.stats()
        assert (stats.requests, stats.accepted, stats.rejected) == (5, 3, 2)
        assert stats.max_accepted_1s == 3
        assert sum(row[2] for row in stats.series) == 3


async def test_mail_retry_after_may_be_an_http_date_or_malformed(client: httpx2.AsyncClient) -> None:
    """Retry-After is sent as configured: an HTTP date (computed per answer) or any text."""
    with MailProvider(latency=0, limit=0, retry_after=lambda: http_date(5)) as dated:
        answer = await client.post(dated.endpoint, json=MAIL)
        assert answer.status_code == 429
        assert parsedate_to_datetime(answer.headers["retry-after"]) is not None
    with MailProvider(latency=0, limit=0, retry_after="soon-ish") as malformed:
        answer = await client.post(malformed.endpoint, json=MAIL)
        assert answer.headers["retry-after"] == "soon-ish"


async def test_concurrency_in_flight_is_counted_and_duplicates_are_visible(client: httpx2.AsyncClient) -> None:
    """Requests held in flight together count as concurrency; a key accepted twice counts as a duplicate."""
    with MailProvider(latency=0) as mail:
        mail.hold()
        keys = ["a", "b", "c", "d", "a"]
        calls = [
            asyncio.create_task(client.post(mail.endpoint, json=MAIL, headers={"Idempotency-Key": k})) for k in keys
        ]
        stats = await mail.wait_for_async(lambda s: s.in_flight == 5)
        assert stats.max_in_flight == 5
        mail.release()
        answers = await asyncio.gather(*calls)

        assert [a.status_code for a in answers] == [200] * 5
        stats = await mail.wait_for_async(lambda s: s.in_flight == 0)
        assert (stats.max_in_flight, stats.distinct_keys, stats.duplicates) == (5, 4, 1)


async def test_model_answers_openai_shape_and_limits_tokens_per_minute(client: httpx2.AsyncClient) -> None:
    """Usage is deterministic (ceil(chars / 4) + completion_tokens); beyond the TPM window, 429 + Retry-After."""
    with ModelProvider(latency=0, tokens_per_minute=250, completion_tokens=50) as model:
        request = {"model": "m", "messages": [{"role": "user", "content": "x" * 198}]}  # 50 prompt tokens
        url = model.endpoint + "/chat/completions"
        answers = [await client.post(url, json=request, headers={"Idempotency-Key": f"t{i}"}) for i in range(3)]

        assert [a.status_code for a in answers] == [200, 200, 429]
        body = answers[0].json()
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"] == {"prompt_tokens": 50, "completion_tokens": 50, "total_tokens": 100}
        assert int(answers[2].headers["retry-after"]) >= 1
        stats = model.stats()
        assert (stats.accepted, stats.rejected, stats.tokens, stats.max_tokens_60s) == (2, 1, 200, 200)


def test_process_form_prints_its_url_and_serves_stats() -> None:
    """`python -m tests.providers mail` prints its base URL first and answers GET /stats with the counters."""
    command = [sys.executable, "-m", "tests.providers", "mail", "--latency", "0", "--limit", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx2.Client(timeout=10.0, trust_env=False) as client:
            client.post(url + "/send", json=MAIL)
            client.post(url + "/send", json=MAIL)
            stats = json.loads(client.get(url + "/stats").text)
        assert (stats["requests"], stats["accepted"], stats["rejected"]) == (2, 1, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0
