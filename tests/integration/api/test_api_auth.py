"""Bearer tokens and roles: missing, bad, revoked, wrong role, the failed-auth limit, the CLI."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.auth import Role, TokenStore, hash_token
from micboard.collector.cli import main as collector_main
from micboard.collector.store.database import create_engine
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from tests.live_api import LiveApi


async def test_missing_token_is_401_problem(api: LiveApi) -> None:
    status, body, response = await api.call("GET", "/api/v1/devices", role=None)
    assert status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.content_type == "application/problem+json"
    assert body["code"] == "auth.missing" and body["status"] == 401
    assert set(body) == {"type", "title", "status", "detail", "code"}


async def test_bad_token_is_401_and_never_logged(api: LiveApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "mbt_this-is-not-a-real-token-0123456789"
    status, body, response = await api.call(
        "GET", "/api/v1/devices", role=None, headers={"Authorization": f"Bearer {secret}"}
    )
    assert status == 401 and body["code"] == "auth.invalid"
    assert "invalid_token" in response.headers["WWW-Authenticate"]
    assert "authentication failed" in caplog.text
    assert secret not in caplog.text
    status, body, _ = await api.call(
        "GET", "/api/v1/devices", role=None, headers={"Authorization": "Basic abc"}
    )
    assert status == 401 and body["code"] == "auth.missing"


async def test_roles(api: LiveApi) -> None:
    group = {"name": "Band", "channels": []}
    assert (await api.call("POST", "/api/v1/groups", role="viewer", json=group))[0] == 403
    status, created, _ = await api.call("POST", "/api/v1/groups", role="operator", json=group)
    assert status == 201 and created["name"] == "Band"
    status, body, _ = await api.call("GET", "/api/v1/tokens", role="operator")
    assert status == 403 and body["code"] == "auth.forbidden"
    assert (await api.call("GET", "/api/v1/tokens", role="admin"))[0] == 200
    assert (await api.call("POST", "/api/v1/alerts/1/acknowledge", role="viewer"))[0] == 403
    for role in ("viewer", "operator", "admin"):
        assert (await api.get("/api/v1/channels", role=role))[0] == 200
        # Every token may ask who it is: a client offers what the role allows.
        status, me, _ = await api.call("GET", "/api/v1/session", role=role)
        assert status == 200 and me["role"] == role and me["name"] == f"test-{role}"
        assert isinstance(me["token_id"], int) and api.tokens[role] not in str(me)
    assert (await api.call("GET", "/api/v1/session", role=None))[0] == 401


async def test_failed_auth_is_rate_limited_per_address(api: LiveApi) -> None:
    bad = {"Authorization": "Bearer mbt_wrong"}
    for _ in range(10):
        assert (await api.call("GET", "/api/v1/sites", role=None, headers=bad))[0] == 401
    status, body, response = await api.call("GET", "/api/v1/sites", role=None, headers=bad)
    assert status == 429 and body["code"] == "auth.rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    # Once limited, every wrong token from the address is refused alike (a guess learns nothing),
    # and a request without one too.
    assert (await api.call("GET", "/api/v1/sites", role=None, headers={"Authorization": "Bearer mbt_x"}))[
        0
    ] == 429
    assert (await api.call("GET", "/api/v1/sites", role=None))[0] == 429
    # A valid token still passes: behind a proxy or a NAT, others share the address.
    assert (await api.call("GET", "/api/v1/sites", role="viewer"))[0] == 200
    _, metrics = await api.get("/metrics", role=None)
    assert "micboard_auth_rate_limited_total 3.0" in metrics
    assert "micboard_auth_failures_total 10.0" in metrics


async def test_missing_tokens_do_not_count_towards_the_limit(api: LiveApi) -> None:
    for _ in range(15):
        assert (await api.call("GET", "/api/v1/sites", role=None))[0] == 401
    assert (await api.get("/api/v1/sites"))[0] == 200


async def test_tokens_api_create_use_revoke(api: LiveApi) -> None:
    status, created, _ = await api.call(
        "POST", "/api/v1/tokens", role="admin", json={"name": "wall", "role": "viewer"}
    )
    assert status == 201 and created["token"].startswith("mbt_") and created["role"] == "viewer"
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert (await api.call("GET", "/api/v1/sites", role=None, headers=headers))[0] == 200
    _, listing, _ = await api.call("GET", "/api/v1/tokens", role="admin")
    assert created["id"] in [t["id"] for t in listing["items"]]
    assert all("token" not in t and "hash" not in t for t in listing["items"])
    assert (await api.call("DELETE", f"/api/v1/tokens/{created['id']}", role="admin"))[0] == 204
    assert (await api.call("GET", "/api/v1/sites", role=None, headers=headers))[0] == 401
    status, body, _ = await api.call("DELETE", "/api/v1/tokens/9999", role="admin")
    assert status == 404 and body["code"] == "token.not_found"


async def test_tokens_are_stored_hashed(engine: AsyncEngine) -> None:
    store = TokenStore(engine)
    record, secret = await store.create("desk", Role.OPERATOR)
    assert secret.startswith("mbt_") and len(secret) > 40
    principal = await store.verify(secret)
    assert principal is not None and principal.role is Role.OPERATOR and principal.name == "desk"
    assert await store.verify(secret + "x") is None
    assert await store.verify("") is None
    async with engine.connect() as conn:
        from sqlalchemy import text

        stored = (
            await conn.execute(text("SELECT hash FROM api_tokens WHERE id = :id"), {"id": record.id})
        ).scalar_one()
    assert stored == hash_token(secret) and secret not in stored


async def test_bootstrap_token_is_created_once(
    engine: AsyncEngine, nats_server: EmbeddedNats, api_factory: Callable[..., AsyncIterator[LiveApi]]
) -> None:
    token = "mbt_bootstrap-for-tests-0123456789abcdef"
    for _ in range(2):
        async for live in api_factory(engine, nats_server.url, bootstrap_token=token):
            status, _, _ = await live.call(
                "GET", "/api/v1/tokens", role=None, headers={"Authorization": f"Bearer {token}"}
            )
            assert status == 200
    names = [t.name for t in await TokenStore(engine).list_tokens()]
    assert names.count("bootstrap") == 1


def test_token_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("MICBOARD_DATABASE_URL", url)
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path))
    assert collector_main(["token", "create", "--role", "operator", "--name", "desk"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("mbt_")
    assert collector_main(["token", "list"]) == 0
    listing = capsys.readouterr().out
    assert "operator" in listing and "desk" in listing and secret not in listing

    import asyncio

    async def verify() -> bool:
        engine = create_engine(url)
        try:
            return await TokenStore(engine).verify(secret) is not None
        finally:
            await engine.dispose()

    assert asyncio.run(verify())
    assert collector_main(["token", "revoke", "1"]) == 0
    assert asyncio.run(verify()) is False
    assert collector_main(["token", "revoke", "42"]) == 2
