"""The AsyncAPI document parses with the official parser (@asyncapi/parser 3.x, web/package.json) with
no error and no warning: the committed asyncapi.yaml and the document the app generates now."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VALIDATE = ROOT / "web" / "validate.mjs"
PARSER = ROOT / "web" / "node_modules" / "@asyncapi" / "parser" / "package.json"
FAILING = {"error", "warning"}


def node() -> str:
    """The node binary; skips without it, except in CI (`CI=true`), where that is a failure."""
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("node is not installed (CI needs it: apt-get install nodejs npm)")
        pytest.skip("node is not installed: the AsyncAPI document is checked with the npm parser")
    assert PARSER.is_file(), "@asyncapi/parser is not installed: run `make web` (npm ci --prefix web)"
    return found


def parse(document: Path) -> dict[str, Any]:
    """What web/validate.mjs reports for one document: {"parsed", "diagnostics": [...]}."""
    done = subprocess.run(
        [node(), str(VALIDATE), str(document)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode in (0, 1), f"validate.mjs failed ({done.returncode}):\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    # The script's exit status and its report agree (a CI step may use either).
    failing = [d for d in report["diagnostics"] if d["severity"] in FAILING]
    assert done.returncode == (1 if failing or not report["parsed"] else 0)
    return report


def document(which: str, scratch: Path) -> Path:
    """The committed file, or the document as the app describes itself now (FastStream's public schema API)."""
    if which == "asyncapi.yaml":
        return ROOT / "asyncapi.yaml"
    from streams.app import app

    out = scratch / "generated.yaml"
    out.write_text(app.schema.to_specification().to_yaml())
    return out


@pytest.mark.parametrize("which", ["asyncapi.yaml", "generated"])
def test_document_parses_without_errors_or_warnings(which: str, scratch_dir: Path) -> None:
    """The official parser reads the document and reports nothing of severity error or warning."""
    report = parse(document(which, scratch_dir))
    assert report["parsed"], report
    failing = [d for d in report["diagnostics"] if d["severity"] in FAILING]
    assert not failing, "\n".join(f"{d['severity']} {d['code']} at {d['path'] or '/'}: {d['message']}" for d in failing)


@pytest.mark.parametrize("which", ["asyncapi.yaml", "generated"])
def test_every_channel_has_an_address(which: str, scratch_dir: Path) -> None:
    """A tool can find every documented channel: none is left without an address (AsyncAPI reads that as unknown)."""
    channels = yaml.safe_load(document(which, scratch_dir).read_text())["channels"]
    assert not sorted(name for name, channel in channels.items() if not channel.get("address"))


def test_the_check_fails_on_a_flawed_document(scratch_dir: Path) -> None:
    """The check is not vacuous: an operation sending to a channel that does not exist is an error."""
    flawed = yaml.safe_load((ROOT / "asyncapi.yaml").read_text())
    operation = next(iter(flawed["operations"].values()))
    operation["channel"] = {"$ref": "#/channels/no-such-channel"}
    path = scratch_dir / "flawed.yaml"
    path.write_text(yaml.safe_dump(flawed))
    report = parse(path)
    assert not report["parsed"] or any(d["severity"] in FAILING for d in report["diagnostics"]), report
