"""The fleet dashboard: static files served by the collector, with a strict security policy.

The page is plain HTML, CSS and JavaScript modules; it talks to the REST API and the live
WebSocket with a bearer token kept in the browser's session storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

STATIC_DIR: Final[Path] = Path(__file__).resolve().parent / "static"
"""Where index.html, app.js, style.css and their assets live."""

SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # The files change with the collector; revalidating is cheap on a LAN and avoids stale UIs.
    "Cache-Control": "no-cache",
}
"""Headers on every dashboard response."""

CONTENT_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
"""The only file types served; anything else under ``/static`` is a 404."""


def _file_response(path: Path) -> web.FileResponse:
    response = web.FileResponse(path, headers=SECURITY_HEADERS)
    response.content_type = CONTENT_TYPES[path.suffix].split(";")[0]
    if "charset" in CONTENT_TYPES[path.suffix]:
        response.charset = "utf-8"
    return response


def _not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(text="not found", headers=SECURITY_HEADERS)


async def index(request: web.Request) -> web.FileResponse:
    """``GET /``: the single page of the dashboard."""
    return _file_response(STATIC_DIR / "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """``GET /static/{path}``: a file under :data:`STATIC_DIR`, never outside it."""
    relative = request.match_info["path"]
    if not relative or "\x00" in relative or "\\" in relative:
        raise _not_found()
    candidate = (STATIC_DIR / relative).resolve()
    if not candidate.is_relative_to(STATIC_DIR) or candidate.suffix not in CONTENT_TYPES:
        raise _not_found()
    if not candidate.is_file():
        raise _not_found()
    return _file_response(candidate)


async def favicon(request: web.Request) -> web.FileResponse:
    """``GET /favicon.ico``: the icon, for browsers that ask before reading the page."""
    return _file_response(STATIC_DIR / "favicon.svg")


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the dashboard at ``/`` and its files at ``/static/...`` on ``app``."""
    app.router.add_get("/", index, name="dashboard")
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/static/{path:.+}", static_file, name="dashboard-static")
