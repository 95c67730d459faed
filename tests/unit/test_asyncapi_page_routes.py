"""The AsyncAPI page's routes: FastStream's page pointed at assets the worker serves, and a page that
says how to install them when they are missing (the worker runs either way)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from faststream.asgi import AsgiFastStream
from faststream.specification import AsyncAPI

from streams.core.logging import configure_logging
from streams.ops import asyncapi_page

STUBS = {
    "browser/standalone/index.js": b"window.AsyncApiStandalone = {render() {}};\n",
    "browser/standalone/index.js.LICENSE.txt": b"/*! third-party notices */\n",
    "styles/default.min.css": b"body{margin:0}\n",
    "LICENSE": b"Apache License\nVersion 2.0, January 2004\n",
}


def installed(root: Path) -> Path:
    """A package directory holding stand-ins for the files the page needs."""
    for name, body in STUBS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    return root


async def client_for(package_dir: Path) -> AsyncIterator[httpx2.AsyncClient]:
    app = AsgiFastStream(specification=AsyncAPI(title="pipeline", version="0.1.0"))
    for path, route in asyncapi_page.make_routes("/docs/asyncapi", app.schema, package_dir):
        app.mount(path, route)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://worker") as client:
        yield client


@pytest.fixture
async def with_assets(scratch_dir: Path) -> AsyncIterator[httpx2.AsyncClient]:
    async for client in client_for(installed(scratch_dir / "react-component")):
        yield client


@pytest.fixture
async def without_assets(scratch_dir: Path) -> AsyncIterator[httpx2.AsyncClient]:
    async for client in client_for(scratch_dir / "not-installed"):
        yield client


async def test_page_loads_script_stylesheet_and_icon_from_the_worker(with_assets: httpx2.AsyncClient) -> None:
    """The page is FastStream's, its script, stylesheet and icon on relative URLs of ours, no other host named."""
    res = await with_assets.get("/docs/asyncapi")
    assert res.status_code == 200
    assert res.headers["content-type"] == "text/html; charset=utf-8"
    html = res.text
    assert '<script src="asyncapi/assets/index.js"></script>' in html
    assert '<link rel="stylesheet" href="asyncapi/assets/default.min.css">' in html
    assert '<link rel="icon" type="image/svg+xml" href="asyncapi/assets/icon.svg">' in html
    assert "window.AsyncApiStandalone.render(" in html
    assert not re.findall(r"(?:https?:)?//[\w.-]+", html)
    assert "try" not in re.findall(r"asyncapi/(\w+)", html)  # try-it-out off


async def test_assets_and_licences_are_served_as_installed(with_assets: httpx2.AsyncClient) -> None:
    """Bundle, notices, stylesheet and licence come from the package directory with their content types."""
    served = {
        "index.js": ("browser/standalone/index.js", "text/javascript; charset=utf-8"),
        "index.js.LICENSE.txt": ("browser/standalone/index.js.LICENSE.txt", "text/plain; charset=utf-8"),
        "default.min.css": ("styles/default.min.css", "text/css; charset=utf-8"),
        "LICENSE": ("LICENSE", "text/plain; charset=utf-8"),
    }
    for name, (source, content_type) in served.items():
        res = await with_assets.get(f"/docs/asyncapi/assets/{name}")
        assert res.status_code == 200, name
        assert res.content == STUBS[source]
        assert res.headers["content-type"] == content_type
    icon = await with_assets.get("/docs/asyncapi/assets/icon.svg")
    assert icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")
    document = await with_assets.get("/docs/asyncapi.json")
    assert document.json()["info"]["title"] == "pipeline"


async def test_missing_assets_page_says_how_to_install_them(
    without_assets: httpx2.AsyncClient, scratch_dir: Path
) -> None:
    """Without the component the page answers 503 naming `make web`; the document is still served."""
    res = await without_assets.get("/docs/asyncapi")
    assert res.status_code == 503
    assert "make web" in res.text
    assert "npm ci --prefix web" in res.text
    assert str(scratch_dir / "not-installed") in res.text
    script = await without_assets.get("/docs/asyncapi/assets/index.js")
    assert script.status_code == 404
    assert b"make web" in script.content
    assert (await without_assets.get("/docs/asyncapi.json")).status_code == 200


def test_check_assets_warns_when_missing(scratch_dir: Path) -> None:
    """Start-up logs a warning naming the fix instead of failing; an installed package passes quietly."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    real, sys.stdout = sys.stdout, stdout  # logging writes where stdout is when it is configured
    try:
        configure_logging("INFO", "json")
    finally:
        sys.stdout = real
    try:
        assert not asyncapi_page.check_assets(scratch_dir / "not-installed")
        assert asyncapi_page.check_assets(installed(scratch_dir / "react-component"))
    finally:
        configure_logging(os.environ.get("PIPELINE_LOG_LEVEL", "INFO"), os.environ.get("PIPELINE_LOG_FORMAT", "auto"))
        root.handlers[:] = handlers
        root.setLevel(level)
    buffer = stdout.buffer
    assert isinstance(buffer, io.BytesIO)
    (line,) = [json.loads(raw) for raw in buffer.getvalue().decode().splitlines()]
    assert line["level"] == "warning"
    assert line["event"] == "asyncapi page assets missing: the page cannot render"
    assert "make web" in line["fix"]
    assert line["package_dir"] == str(scratch_dir / "not-installed")
    assert "browser/standalone/index.js" in line["missing"]
