"""The dead-letter webhook against a real local HTTP server: what it sends, and that it never fails the caller."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from handlers.errors import DeliveryRejectedError
from schemas import FailureKind
from streams.core.envelope import Envelope
from streams.policy.alerts import Alerter
from streams.policy.failures import Failure
from tests.httpserver import RecordingServer, ScriptedResponse, closed_port_url

ENV = Envelope("rabbit", "email", "m-1", "c-1", b"{}", {}, attempt=3)
FAILURE = Failure.of(DeliveryRejectedError("provider said 422"), FailureKind.FATAL, ENV)


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    """A started recording server."""
    with RecordingServer() as srv:
        yield srv


async def test_webhook_receives_the_dead_letter(server: RecordingServer) -> None:
    """One POST names the message, its queue, the failure and the dead letter's id."""
    alerter = Alerter(server.url_for("/alert"))
    try:
        await alerter.dead_lettered(ENV, FAILURE, 42)
    finally:
        await alerter.close()

    [request] = server.requests
    assert request.path == "/alert"
    assert request.json["dead_letter_id"] == 42
    assert request.json["message_id"] == "m-1"
    assert request.json["queue"] == "email"
    assert request.json["failure_kind"] == FailureKind.FATAL.value
    assert "provider said 422" in request.json["exception_message"]


@pytest.mark.parametrize("answer", [500, 404, ScriptedResponse(200, delay=5)])
async def test_a_failing_webhook_is_logged_not_raised(server: RecordingServer, answer: int | ScriptedResponse) -> None:
    """An error status or a webhook slower than the alert timeout does not fail the dead-lettering: a warning."""
    server.script(answer)
    alerter = Alerter(server.url_for("/alert"))
    try:
        with structlog.testing.capture_logs() as logs:
            await alerter.dead_lettered(ENV, FAILURE, 7)
    finally:
        await alerter.close()
    assert len(server.requests) == 1
    assert [(e["event"], e["dead_letter_id"]) for e in logs] == [("alert webhook failed", 7)]


async def test_an_unreachable_webhook_is_not_raised() -> None:
    """Nothing listening: a warning, and the caller goes on."""
    alerter = Alerter(closed_port_url())
    try:
        with structlog.testing.capture_logs() as logs:
            await alerter.dead_lettered(ENV, FAILURE, 7)
    finally:
        await alerter.close()
    assert [e["event"] for e in logs] == ["alert webhook failed"]
