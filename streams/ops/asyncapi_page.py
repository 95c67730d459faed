"""The AsyncAPI page, whole from the worker: FastStream's page with its script, stylesheet and icon on our routes.

FastStream's page loads `@asyncapi/react-component` from a public CDN and its icons from
asyncapi.com, so offline or behind a strict Content-Security-Policy it stays blank. The component is
installed at build time instead (`make web`: `npm ci --prefix web`, the version pinned in
web/package-lock.json) and served under `<page>/assets/`, its licences beside it. Without it the
worker still starts: a warning at start-up, and the page says how to install it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.response import JSONResponse
from faststream.asgi.types import Scope
from faststream.specification.asyncapi import get_asyncapi_html
from faststream.specification.base import SpecificationFactory

from streams.core.logging import get_logger

log = get_logger("pipeline.asyncapi_page")

# Where `npm ci --prefix web` installs the component, relative to the working directory like the
# default database file (the image copies it to /app/web/node_modules/...).
PACKAGE_DIR = Path("web/node_modules/@asyncapi/react-component")
INSTALL_HINT = "run `make web` (npm ci --prefix web) in the project directory, then restart the worker"

# A neutral icon of our own, so the browser asks nobody else for one (FastStream's page links asyncapi.com's).
ICON_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1e293b"/>'
    b'<path d="M3 5h10M3 8h7M3 11h10" stroke="#5eead4" stroke-width="1.6" stroke-linecap="round"/></svg>'
)
# Any <link> FastStream's page points at another host (its icons): dropped, ours put in their place.
EXTERNAL_LINK = re.compile(r'[ \t]*<link\b[^>]*\bhref="(?:https?:)?//[^"]*"[^>]*>\n?', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the installed package, served under `<page>/assets/<name>`."""

    name: str
    source: str  # relative to the package directory
    content_type: str


# The bundle's first line points at `index.js.LICENSE.txt` beside it: the names keep the package's.
SCRIPT = Asset("index.js", "browser/standalone/index.js", "text/javascript; charset=utf-8")
STYLESHEET = Asset("default.min.css", "styles/default.min.css", "text/css; charset=utf-8")
ASSETS = (
    SCRIPT,
    STYLESHEET,
    Asset("index.js.LICENSE.txt", "browser/standalone/index.js.LICENSE.txt", "text/plain; charset=utf-8"),
    Asset("LICENSE", "LICENSE", "text/plain; charset=utf-8"),
)


def missing_assets(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The package's files the page needs that are not installed (empty when the page can render)."""
    return [asset.source for asset in ASSETS if not (package_dir / asset.source).is_file()]


def check_assets(package_dir: Path = PACKAGE_DIR) -> bool:
    """Log a warning naming the fix when the page's script or stylesheet is not installed."""
    missing = missing_assets(package_dir)
    if missing:
        log.warning(
            "asyncapi page assets missing: the page cannot render",
            package_dir=str(package_dir.absolute()),
            missing=missing,
            fix=INSTALL_HINT,
        )
    return not missing


def page_html(specification: SpecificationFactory, assets_url: str) -> str:
    """FastStream's page (try-it-out off) with our asset URLs, and our icon for its external ones."""
    html = get_asyncapi_html(
        specification.to_specification(),
        asyncapi_js_url=f"{assets_url}/{SCRIPT.name}",
        asyncapi_css_url=f"{assets_url}/{STYLESHEET.name}",
        try_it_out_path=None,
    )
    html = EXTERNAL_LINK.sub("", html)
    icon = f'<link rel="icon" type="image/svg+xml" href="{assets_url}/icon.svg">'
    return html.replace("<head>", f"<head>\n        {icon}", 1)


def missing_page(package_dir: Path, missing: list[str]) -> str:
    """What the page says instead when the component is not installed."""
    files = "".join(f"<li><code>{name}</code></li>" for name in missing)
    return f"""<!DOCTYPE html>
<html>
    <head><title>AsyncAPI page not installed</title></head>
    <body>
        <h1>The AsyncAPI page is not installed</h1>
        <p>The worker serves <code>@asyncapi/react-component</code> itself and did not find it under
        <code>{package_dir.absolute()}</code>; missing:</p>
        <ul>{files}</ul>
        <p>To install it, {INSTALL_HINT}. The image (deploy/Dockerfile) installs it at build time.</p>
        <p>The document itself: <a href="asyncapi.json">asyncapi.json</a>.</p>
    </body>
</html>"""


def _html(body: str, status: int = 200) -> AsgiResponse:
    return AsgiResponse(body.encode(), status, headers={"content-type": "text/html; charset=utf-8"})


def make_routes(
    path: str, specification: SpecificationFactory, package_dir: Path = PACKAGE_DIR
) -> list[tuple[str, GetHandler]]:
    """The page at `path`, the document at `path`.json, and the page's assets under `path`/assets/."""
    # Relative URLs: the page keeps working behind a proxy that serves it under a prefix.
    assets_url = f"{PurePosixPath(path).name}/assets"
    cached: dict[str, bytes] = {}

    @get(include_in_schema=False)
    async def page(scope: Scope) -> AsgiResponse:
        """The AsyncAPI page, or how to install it."""
        if missing := missing_assets(package_dir):
            return _html(missing_page(package_dir, missing), 503)
        if "page" not in cached:
            cached["page"] = page_html(specification, assets_url).encode()
        return AsgiResponse(cached["page"], 200, headers={"content-type": "text/html; charset=utf-8"})

    @get(include_in_schema=False)
    async def document(scope: Scope) -> AsgiResponse:
        """The AsyncAPI document as JSON."""
        return JSONResponse(specification.to_specification().to_jsonable())

    @get(include_in_schema=False)
    async def icon(scope: Scope) -> AsgiResponse:
        """The page's icon."""
        return AsgiResponse(ICON_SVG, 200, headers={"content-type": "image/svg+xml", "cache-control": "max-age=86400"})

    def serve(asset: Asset) -> GetHandler:
        async def asset_file(scope: Scope) -> AsgiResponse:
            body = cached.get(asset.name)
            if body is None:
                try:
                    body = await asyncio.to_thread((package_dir / asset.source).read_bytes)
                except FileNotFoundError:
                    return AsgiResponse(f"{asset.source} is not installed: {INSTALL_HINT}\n".encode(), 404)
                cached[asset.name] = body
            headers = {"content-type": asset.content_type, "x-content-type-options": "nosniff"}
            return AsgiResponse(body, 200, headers={**headers, "cache-control": "max-age=300"})

        asset_file.__doc__ = f"`{asset.source}` of @asyncapi/react-component."
        return get(asset_file, include_in_schema=False)

    base = path.rstrip("/")
    return [
        (base, page),
        (f"{base}.json", document),
        (f"{base}/assets/icon.svg", icon),
        *((f"{base}/assets/{asset.name}", serve(asset)) for asset in ASSETS),
    ]
