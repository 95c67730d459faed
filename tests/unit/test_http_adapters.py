"""HttpMailer and OpenAIModel against a real local HTTP server (no HTTP client mocking)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx2
import pytest

from handlers.errors import (
    DeliveryRejectedError,
    DependencyUnavailableError,
    FatalError,
    PipelineError,
    ThrottledError,
    TransientError,
)
from handlers.http import MAX_RETRY_AFTER, new_session, retry_after
from handlers.mailers import HttpMailer
from handlers.models import OpenAIModel
from handlers.ports import Completion
from schemas import SendEmail
from tests.httpserver import RecordingServer, ScriptedResponse, closed_port_url

CLIENT_TIMEOUT = 0.3
MAIL = SendEmail(to="ada@example.com", subject="Welcome", body="Hello Ada.", template="welcome")
# httpx2 (the tests' own client of the recording server) builds an SSL context per client (~50 ms); share one.
SSL_CONTEXT = ssl.create_default_context()
FATAL_STATUSES = [400, 401, 403, 404, 409, 422]
# Without Retry-After: 429 is throttling (a second's wait), the rest are failures worth a retry.
TRANSIENT_STATUSES = [408, 500, 502, 503, 504]


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    """A started recording server; tests script its answers."""
    with RecordingServer() as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The adapters' session, as the worker builds it, with a short timeout."""
    async with new_session(CLIENT_TIMEOUT) as s:
        yield s


def _completion_body(content: Any = "Hi there.", usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    if usage is not None:
        body["usage"] = usage
    return body


# -- HttpMailer ----------------------------------------------------------------------------


async def test_mailer_2xx_returns_provider_id_and_sends_contract_payload(
    server: RecordingServer, session: aiohttp.ClientSession
) -> None:
    """A 2xx answer yields the provider's `id`, after a POST of `{to, subject, body, template}`."""
    server.script(ScriptedResponse(202, {"id": "prov-42"}))
    mailer = HttpMailer(session, server.url_for("/v1/send"))

    provider_id = await mailer.send(MAIL, idempotency_key="msg-1")

    assert provider_id == "prov-42"
    [request] = server.requests
    assert request.method == "POST"
    assert request.path == "/v1/send"
    assert request.headers["content-type"] == "application/json"
    assert request.json == {
        "to": "ada@example.com",
        "subject": "Welcome",
        "body": "Hello Ada.",
        "template": "welcome",
    }


async def test_mailer_sends_idempotency_key_and_no_authorization_without_api_key(
    server: RecordingServer, session: aiohttp.ClientSession
) -> None:
    """The message id travels as `Idempotency-Key`, and no `Authorization` header is sent without a key."""
    mailer = HttpMailer(session, server.url)

    await mailer.send(MAIL, idempotency_key="msg-7")

    [request] = server.requests
    assert request.headers["idempotency-key"] == "msg-7"
    assert "authorization" not in request.headers


async def test_mailer_sends_bearer_token_when_api_key_is_set(
    server: RecordingServer, session: aiohttp.ClientSession
) -> None:
    """With an api key the mailer sends `Authorization: Bearer <key>` next to the idempotency key."""
    mailer = HttpMailer(session, server.url, api_key="s3cret")

    await mailer.send(MAIL, idempotency_key="msg-8")

    [request] = server.requests
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["idempotency-key"] == "msg-8"


async def test_mailer_sends_null_template_when_absent(server: RecordingServer, session: aiohttp.ClientSession) -> None:
    """A mail without a template is still sent with all four contract keys, `template` null."""
    mail = SendEmail(to="bob@example.com", subject="Hi", body="")

    await HttpMailer(session, server.url).send(mail, idempotency_key="msg-9")

    assert server.requests[0].json == {"to": "bob@example.com", "subject": "Hi", "body": "", "template": None}


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (ScriptedResponse(200, {}), None),
        (ScriptedResponse(200, {"id": None}), None),
        (ScriptedResponse(200, {"id": 123}), "123"),
        (ScriptedResponse(200, ["not", "an", "object"]), None),
        (ScriptedResponse(204, raw=b""), None),
        (ScriptedResponse(200, raw=b"<html>ok</html>", headers={"Content-Type": "text/html"}), None),
    ],
    ids=["no-id", "null-id", "numeric-id", "json-list", "204-empty", "non-json"],
)
async def test_mailer_2xx_without_usable_id_still_counts_as_sent(
    server: RecordingServer, session: aiohttp.ClientSession, response: ScriptedResponse, expected: str | None
) -> None:
    """Any 2xx means sent: a missing or unreadable id gives None (a numeric one is stringified)."""
    server.script(response)

    assert await HttpMailer(session, server.url).send(MAIL, idempotency_key="m") == expected


@pytest.mark.parametrize("status", FATAL_STATUSES)
async def test_mailer_4xx_is_fatal_delivery_rejected(
    server: RecordingServer, session: aiohttp.ClientSession, status: int
) -> None:
    """A 4xx other than 408/429 raises DeliveryRejectedError, a FatalError (dead letter, no retry)."""
    server.script(ScriptedResponse(status, {"error": "nope"}))

    with pytest.raises(DeliveryRejectedError, match=str(status)) as info:
        await HttpMailer(session, server.url).send(MAIL, idempotency_key="m")

    assert isinstance(info.value, FatalError)
    assert not isinstance(info.value, TransientError)
    assert len(server.requests) == 1  # the adapter itself never retries


@pytest.mark.parametrize("status", TRANSIENT_STATUSES)
async def test_mailer_5xx_408_429_are_transient(
    server: RecordingServer, session: aiohttp.ClientSession, status: int
) -> None:
    """5xx and 408 without Retry-After raise DependencyUnavailableError, a TransientError (retry later)."""
    server.script(ScriptedResponse(status, {"error": "later"}))

    with pytest.raises(DependencyUnavailableError, match=str(status)) as info:
        await HttpMailer(session, server.url).send(MAIL, idempotency_key="m")

    assert isinstance(info.value, TransientError)
    assert not isinstance(info.value, FatalError)
    assert len(server.requests) == 1


async def test_mailer_timeout_is_transient(server: RecordingServer, session: aiohttp.ClientSession) -> None:
    """A provider slower than the client timeout raises DependencyUnavailableError."""
    server.script(ScriptedResponse(200, {"id": "late"}, delay=CLIENT_TIMEOUT * 5))

    with pytest.raises(DependencyUnavailableError, match="timed out") as info:
        await HttpMailer(session, server.url).send(MAIL, idempotency_key="m")

    assert isinstance(info.value.__cause__, TimeoutError)
    assert len(server.requests) == 1  # it did arrive; the answer was too late


async def test_mailer_connection_refused_is_transient(session: aiohttp.ClientSession) -> None:
    """Nothing listening on the port raises DependencyUnavailableError, not a raw aiohttp error."""
    with pytest.raises(DependencyUnavailableError, match="unreachable") as info:
        await HttpMailer(session, closed_port_url()).send(MAIL, idempotency_key="m")

    assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)


async def test_mailer_scripted_503_twice_then_200_each_call_sees_its_answer(
    session: aiohttp.ClientSession,
) -> None:
    """Successive sends see the scripted statuses in order, with the same idempotency key each time."""
    with RecordingServer(503, 503, ScriptedResponse(200, {"id": "third-time"})) as server:
        mailer = HttpMailer(session, server.url)
        outcomes: list[str] = []
        for _ in range(3):
            try:
                outcomes.append(str(await mailer.send(MAIL, idempotency_key="same")))
            except DependencyUnavailableError:
                outcomes.append("transient")

        assert outcomes == ["transient", "transient", "third-time"]
        assert [r.headers["idempotency-key"] for r in server.requests] == ["same"] * 3
        assert server.pending == 0


# -- OpenAIModel ---------------------------------------------------------------------------


@pytest.mark.parametrize("base_suffix", ["", "/"], ids=["no-slash", "trailing-slash"])
async def test_openai_posts_chat_completion_and_parses_answer(
    server: RecordingServer, session: aiohttp.ClientSession, base_suffix: str
) -> None:
    """It POSTs `{model, messages:[{role:user, content}]}` to `<base>/chat/completions`, reads the answer."""
    server.script(ScriptedResponse(200, _completion_body("Hi there.", {"prompt_tokens": 5, "completion_tokens": 3})))
    model = OpenAIModel(session, server.url_for("/v1") + base_suffix, api_key="sk-test")

    answer = await model.complete("Say hi", model="gpt-4o-mini", idempotency_key="msg-3")

    assert answer == Completion(text="Hi there.", prompt_tokens=5, completion_tokens=3)
    [request] = server.requests
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.json == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["idempotency-key"] == "msg-3"


async def test_openai_without_api_key_sends_no_authorization_header(
    server: RecordingServer, session: aiohttp.ClientSession
) -> None:
    """Without an api key no `Authorization` header is sent (the idempotency key still is)."""
    server.script(ScriptedResponse(200, _completion_body("ok")))

    await OpenAIModel(session, server.url).complete("p", model="local", idempotency_key="m")

    assert "authorization" not in server.requests[0].headers
    assert server.requests[0].headers["idempotency-key"] == "m"


@pytest.mark.parametrize(
    ("usage", "prompt_tokens"),
    [(None, 0), ({}, 0), ({"prompt_tokens": None, "completion_tokens": None}, 0), ({"prompt_tokens": 4}, 4)],
    ids=["no-usage", "empty-usage", "null-counts", "partial-usage"],
)
async def test_openai_missing_usage_counts_as_zero_tokens(
    server: RecordingServer, session: aiohttp.ClientSession, usage: Any, prompt_tokens: int
) -> None:
    """Absent or null usage counters count as zero tokens instead of failing a good completion."""
    server.script(ScriptedResponse(200, _completion_body("ok", usage)))

    answer = await OpenAIModel(session, server.url).complete("p", model="local", idempotency_key="m")

    assert answer == Completion(text="ok", prompt_tokens=prompt_tokens, completion_tokens=0)


@pytest.mark.parametrize("status", FATAL_STATUSES)
async def test_openai_4xx_is_fatal(server: RecordingServer, session: aiohttp.ClientSession, status: int) -> None:
    """A 4xx other than 408/429 from the model API raises DeliveryRejectedError (fatal)."""
    server.script(ScriptedResponse(status, {"error": {"message": "bad request"}}))

    with pytest.raises(DeliveryRejectedError):
        await OpenAIModel(session, server.url).complete("p", model="m", idempotency_key="k")


@pytest.mark.parametrize("status", TRANSIENT_STATUSES)
async def test_openai_5xx_408_429_are_transient(
    server: RecordingServer, session: aiohttp.ClientSession, status: int
) -> None:
    """5xx and 408 from the model API raise DependencyUnavailableError (transient)."""
    server.script(ScriptedResponse(status, {"error": {"message": "overloaded"}}))

    with pytest.raises(DependencyUnavailableError):
        await OpenAIModel(session, server.url).complete("p", model="m", idempotency_key="k")


async def test_openai_timeout_and_connection_refused_are_transient(
    server: RecordingServer, session: aiohttp.ClientSession
) -> None:
    """A slow model API and an unreachable one both raise DependencyUnavailableError."""
    server.script(ScriptedResponse(200, _completion_body(), delay=CLIENT_TIMEOUT * 5))

    with pytest.raises(DependencyUnavailableError, match="timed out"):
        await OpenAIModel(session, server.url).complete("p", model="m", idempotency_key="k")
    with pytest.raises(DependencyUnavailableError, match="unreachable"):
        await OpenAIModel(session, closed_port_url()).complete("p", model="m", idempotency_key="k")


@pytest.mark.parametrize(
    "response",
    [
        ScriptedResponse(200, raw=b"{not json", headers={"Content-Type": "application/json"}),
        ScriptedResponse(200, raw=b"", headers={"Content-Type": "application/json"}),
        ScriptedResponse(200, None),
        ScriptedResponse(200, ["a", "list"]),
        ScriptedResponse(200, {}),
        ScriptedResponse(200, {"choices": []}),
        ScriptedResponse(200, {"choices": [{}]}),
        ScriptedResponse(200, {"choices": [{"message": None}]}),
        ScriptedResponse(200, _completion_body(content=None)),
        ScriptedResponse(200, _completion_body(content=["parts"])),
        ScriptedResponse(200, _completion_body(usage=["not", "a", "dict"])),
        ScriptedResponse(200, _completion_body(usage={"prompt_tokens": "many"})),
        ScriptedResponse(200, _completion_body(usage={"completion_tokens": -1})),
        ScriptedResponse(200, raw=b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1e400}}'),
    ],
    ids=[
        "invalid-json",
        "empty-body",
        "json-null",
        "json-list",
        "no-choices",
        "empty-choices",
        "choice-without-message",
        "null-message",
        "null-content",
        "non-text-content",
        "usage-not-object",
        "usage-not-number",
        "usage-negative",
        "usage-infinite",
    ],
)
async def test_openai_malformed_2xx_is_transient(
    server: RecordingServer, session: aiohttp.ClientSession, response: ScriptedResponse
) -> None:
    """A 2xx the adapter cannot read raises DependencyUnavailableError, never a raw parsing error."""
    server.script(response)

    with pytest.raises(DependencyUnavailableError) as info:
        await OpenAIModel(session, server.url).complete("p", model="m", idempotency_key="k")

    assert isinstance(info.value, PipelineError)


# -- the RecordingServer helper itself -----------------------------------------------------


async def test_recording_server_answers_script_in_order_then_default_under_concurrency() -> None:
    """Concurrent requests each consume one scripted answer exactly once; the rest get `default`."""
    with RecordingServer(*[503] * 10, default=ScriptedResponse(200, {"id": "ok"})) as server:
        async with httpx2.AsyncClient(timeout=CLIENT_TIMEOUT, trust_env=False, verify=SSL_CONTEXT) as client:
            responses = await asyncio.gather(
                *(client.post(server.url_for(f"/r/{i}"), json={"i": i}) for i in range(25))
            )

        assert sorted(r.status_code for r in responses) == [200] * 15 + [503] * 10
        assert server.pending == 0
        recorded = server.wait_for_requests(25)
        assert sorted(r.json["i"] for r in recorded) == list(range(25))
        assert {r.path for r in recorded} == {f"/r/{i}" for i in range(25)}


def test_recording_server_wait_for_requests_times_out_and_stop_cuts_delays_short() -> None:
    """wait_for_requests raises TimeoutError when too few requests came, and stop() ends pending delays."""
    server = RecordingServer(ScriptedResponse(200, delay=30)).start()
    worker = threading.Thread(target=_swallow_errors, args=(server.url,), daemon=True)
    worker.start()
    server.wait_for_requests(1)
    with pytest.raises(TimeoutError):
        server.wait_for_requests(2, timeout=0.05)

    started = time.monotonic()
    server.stop()
    worker.join(timeout=5)

    assert time.monotonic() - started < 5
    assert not worker.is_alive()


def _swallow_errors(url: str) -> None:
    with contextlib.suppress(httpx2.HTTPError):
        httpx2.post(url, json={}, timeout=30, trust_env=False, verify=SSL_CONTEXT)


# ---- pushback: 429 / 503 with Retry-After ---------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_in_seconds_is_throttling(
    server: RecordingServer, session: aiohttp.ClientSession, status: int
) -> None:
    """429 or 503 with `Retry-After: 7` raises ThrottledError asking for 7 s: not a failure of the provider."""
    server.script(ScriptedResponse(status, {"error": "slow down"}, headers={"Retry-After": "7"}))

    with pytest.raises(ThrottledError) as info:
        await HttpMailer(session, server.url).send(MAIL, idempotency_key="m")

    assert info.value.retry_after == 7.0
    assert not isinstance(info.value, DependencyUnavailableError)  # the breaker does not count it


async def test_retry_after_as_an_http_date_is_throttling(
    server: RecordingServer, session: aiohttp.ClientSession
) -> None:
    """An HTTP date in Retry-After asks to wait until then."""
    when = time.time() + 30
    header = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(when))
    server.script(ScriptedResponse(429, {"error": {"message": "rate"}}, headers={"Retry-After": header}))

    with pytest.raises(ThrottledError) as info:
        await OpenAIModel(session, server.url).complete("p", model="m", idempotency_key="k")

    assert 25 <= info.value.retry_after <= 31


async def test_429_without_retry_after_waits_a_second(server: RecordingServer, session: aiohttp.ClientSession) -> None:
    """A bare 429 is still the provider pacing us: a short wait, not a failure."""
    server.script(ScriptedResponse(429, {"error": "later"}))

    with pytest.raises(ThrottledError) as info:
        await HttpMailer(session, server.url).send(MAIL, idempotency_key="m")

    assert info.value.retry_after == 1.0


@pytest.mark.parametrize("header", ["soon", "-5", "1.5e400", "Mon, 99 Foo 2026 00:00:00 GMT", ""])
@pytest.mark.parametrize("status", [429, 503])
async def test_malformed_retry_after_is_an_ordinary_transient_failure(
    server: RecordingServer, session: aiohttp.ClientSession, status: int, header: str
) -> None:
    """A Retry-After that cannot be read is an ordinary transient failure (retried with backoff)."""
    server.script(ScriptedResponse(status, {"error": "later"}, headers={"Retry-After": header}))

    with pytest.raises(DependencyUnavailableError) as info:
        await HttpMailer(session, server.url).send(MAIL, idempotency_key="m")

    assert not isinstance(info.value, ThrottledError)


def test_retry_after_reading() -> None:
    """Seconds, dates in the past (no wait), and absurd values (capped) read as RFC 9110 says."""
    assert retry_after("0") == 0.0
    assert retry_after(" 12 ") == 12.0
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
    assert retry_after("99999999") == MAX_RETRY_AFTER
    assert retry_after(None) is None
    assert retry_after("1.5") is None  # delay-seconds is an integer


async def test_session_reads_proxy_variables_only_when_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTPS_PROXY set the adapters' session goes through it; without one it skips the per-call lookup."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with new_session(CLIENT_TIMEOUT) as direct:
        assert not direct.trust_env
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    async with new_session(CLIENT_TIMEOUT) as proxied:
        assert proxied.trust_env
