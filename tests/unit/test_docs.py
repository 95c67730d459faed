"""The AsyncAPI document is generated from the code, current, and leaks nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def generate(out: Path) -> dict[str, object]:
    subprocess.run(
        [sys.executable, "-m", "faststream", "docs", "gen", "--yaml", "streams.app:app", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    loaded: dict[str, object] = yaml.safe_load(out.read_text())
    return loaded


def test_asyncapi_yaml_is_up_to_date(scratch_dir: Path) -> None:
    """`asyncapi.yaml` equals what `make docs` generates now; run `make docs` when this fails."""
    fresh = generate(scratch_dir / "asyncapi.yaml")
    committed = yaml.safe_load((ROOT / "asyncapi.yaml").read_text())
    assert fresh == committed, "asyncapi.yaml is stale: run `make docs`"


def test_asyncapi_documents_every_contract_channel_and_no_password() -> None:
    """Commands, events and dead-letter channels are documented; broker passwords are masked."""
    text = (ROOT / "asyncapi.yaml").read_text()
    for name in ("tasks", "events", "email.dlq", "ai.completion.dlq", "email.sent", "message.dead_lettered"):
        assert name in text, name
    for kind in ("SendEmail", "RequestCompletion", "EmailSent", "CompletionFailed", "MessageDeadLettered"):
        assert kind in text, kind
    assert "guest:guest" not in text
    assert "x-failure-kind" in text
