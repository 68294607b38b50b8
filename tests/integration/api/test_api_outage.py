"""A database the API cannot reach: 503 ``service.unavailable`` with ``Retry-After`` and one warning
line per request, not a 500 and a traceback; a statement that is wrong stays a 500."""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import text

from micboard.collector.api.app import create_app
from micboard.collector.services.devices import DeviceService
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from tests.live_api import LiveApi

ERRORS_LOGGER = "micboard.collector.api.errors"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ERRORS_LOGGER and r.levelno >= logging.WARNING]


async def test_a_database_file_that_cannot_be_opened_is_503(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    api_factory: Callable[..., AsyncIterator[LiveApi]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "store"
    engine = create_engine(f"sqlite+aiosqlite:///{folder / 'micboard.db'}")
    await upgrade(engine)
    try:
        async for api in api_factory(engine, nats_server.url):
            await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1")])
            status, _ = await api.get("/api/v1/devices")
            assert status == 200
            # A missing table is a fault of the collector, not an outage: still a 500.
            async with engine.begin() as conn:
                await conn.execute(text("DROP TABLE history_samples"))
            with caplog.at_level(logging.ERROR, logger=ERRORS_LOGGER):
                status, body = await api.get("/api/v1/devices/1/channels/1/history")
            assert status == 500 and body["code"] == "internal"
            [crash] = warnings_of(caplog)
            assert crash.getMessage() == "unhandled error in request" and crash.exc_info is not None
            caplog.clear()
            # The file's folder goes (the pool kept the removed file open: dropped, so that the
            # next request must open it again).
            shutil.rmtree(folder)
            await engine.dispose()
            with caplog.at_level(logging.INFO, logger=ERRORS_LOGGER):
                status, body, response = await api.call(
                    "GET", "/api/v1/devices", headers={"X-Request-Id": "outage-1"}
                )
            assert status == 503, body
            assert body["code"] == "service.unavailable" and body["title"] == "Service Unavailable"
            assert "(request outage-1)" in body["detail"] and "SELECT" not in body["detail"]
            assert response.headers["Retry-After"] == "5"
            [warning] = warnings_of(caplog)
            assert warning.levelno == logging.WARNING and warning.exc_info is None
            assert warning.getMessage() == "request failed: database or service unreachable"
            assert warning.__dict__["request_id"] == "outage-1"
            assert warning.__dict__["route"] == "/api/v1/devices"
            # The driver's words, not the statement and its parameters.
            assert warning.__dict__["error"] == "OperationalError: unable to open database file"
    finally:
        await engine.dispose()


async def test_a_postgresql_server_nobody_answers_for_is_503(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe is closed: every connection is refused.
    engine = create_engine(f"postgresql+asyncpg://micboard@127.0.0.1:{port}/micboard")
    runner = web.AppRunner(create_app(DeviceService(engine), dashboard=False), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        with caplog.at_level(logging.INFO, logger=ERRORS_LOGGER):
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"{base}/api/v1/sites", headers={"Authorization": "Bearer mbt_not-checked-without-a-db"}
                ) as response,
            ):
                body = await response.json(content_type=None)
        # Checking the token is the first thing that needs the database.
        assert response.status == 503 and body["code"] == "service.unavailable"
        assert response.headers["Retry-After"] == "5"
        [warning] = warnings_of(caplog)
        assert warning.exc_info is None and warning.__dict__["error"].startswith("ConnectionRefusedError")
        assert "mbt_not-checked" not in " ".join(str(v) for r in caplog.records for v in vars(r).values())
    finally:
        await runner.cleanup()
        await engine.dispose()
