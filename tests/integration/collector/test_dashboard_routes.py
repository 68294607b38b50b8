"""The dashboard's static files: content types, security headers, and nothing outside its folder."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from micboard.collector.dashboard import CONTENT_TYPES, STATIC_DIR, add_dashboard_routes

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    app = web.Application()
    add_dashboard_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


def assert_secure(headers: Mapping[str, str]) -> None:
    csp = headers.get("Content-Security-Policy", "")
    assert "default-src 'self'" in csp
    assert "connect-src 'self';" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers.get("X-Content-Type-Options") == "nosniff"
    assert headers.get("Referrer-Policy") == "no-referrer"
    assert headers.get("X-Frame-Options") == "DENY"


async def test_index_is_html_with_the_security_headers(client: Client) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_secure(response.headers)
    html = await response.text()
    assert '<script type="module" src="/static/app.js"></script>' in html


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("tiles.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
async def test_static_files_have_their_content_type(client: Client, name: str, content_type: str) -> None:
    response = await client.get(f"/static/{name}")
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    assert_secure(response.headers)
    assert await response.read() == (STATIC_DIR / name).read_bytes()


async def test_favicon_is_served(client: Client) -> None:
    response = await client.get("/favicon.ico")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/svg+xml"


@pytest.mark.parametrize(
    "path",
    [
        "/static/../__init__.py",
        "/static/%2e%2e/__init__.py",
        "/static/..%2f__init__.py",
        "/static/nope.js",
        "/static/%00.js",
        "/static/a%5c..%5capp.js",
        "/static/index.py",
    ],
)
async def test_nothing_outside_the_folder_or_of_an_unknown_type(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status == 404
    assert b"import" not in await response.read()


def test_every_static_file_has_a_known_type_and_no_inline_script() -> None:
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"index.html", "app.js", "style.css"}
    for path in files:
        assert path.suffix in CONTENT_TYPES or path.name in {"LICENSE", "README"}, path
    html = (STATIC_DIR / "index.html").read_text()
    # The policy forbids inline code: every script is a file and no element carries a handler.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"\son[a-z]+\s*=", html)
    assert " style=" not in html
    for script in STATIC_DIR.glob("*.js"):
        text = script.read_text()
        assert "eval(" not in text and "new Function" not in text and "innerHTML" not in text, script
