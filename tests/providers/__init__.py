"""Local provider simulators over real HTTP on 127.0.0.1: an e-mail API and an OpenAI-compatible model.

Both are plain asyncio (`asyncio.Protocol`, HTTP/1.1 keep-alive, Content-Length bodies): thousands of
requests a second on one core, a task per request, no thread per request. Each runs

- in-process, on its own event loop in a daemon thread, as a context manager:

      with MailProvider(latency=0.1, limit=200) as mail:
          ...  # PIPELINE_MAILER_URL=mail.endpoint
          mail.wait_for(lambda s: s.accepted >= 10)  # woken by every change; `await wait_for_async(...)`
          assert mail.stats().rejected == 0
          mail.hold()  # accepted requests stay in flight until mail.release()

- or as a process: `python -m tests.providers mail --port 0 --latency 0.1 --limit 200`, which prints
  its base URL (`http://127.0.0.1:PORT`) as the first line of stdout and serves until SIGTERM.

Either way `GET /stats` answers the counters as JSON (`ProviderStats.as_json`) and `POST /stats/reset`
zeroes them. `MailProvider` answers any other POST (e.g. `/send`) after `latency` seconds with 200
`{"id": ...}`; beyond `limit` accepted requests in a sliding `window` (1 s) it answers 429 with
`Retry-After` at once. `ModelProvider` answers `POST /v1/chat/completions` after `latency` (1 s) with
an OpenAI-shaped completion whose token counts are deterministic (prompt: ceil(characters / 4) over
the messages' contents; completion: `completion_tokens`), and 429 beyond `tokens_per_minute` in a
sliding 60 s window. A duplicate is an accepted request whose `Idempotency-Key` was accepted before.
"""

from __future__ import annotations

from tests.providers.base import Provider, RetryAfter, http_date
from tests.providers.counters import ProviderStats
from tests.providers.http import Reply
from tests.providers.mail import MailProvider
from tests.providers.model import ModelProvider

__all__ = ("MailProvider", "ModelProvider", "Provider", "ProviderStats", "Reply", "RetryAfter", "http_date")
