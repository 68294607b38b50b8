"""Real fixtures for every test: a nats-server on free ports, SQLite files, the PostgreSQL server."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.live_api import LiveApi, start_api

from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.natsd import EmbeddedNats

PG_DSN = os.environ.get("MICBOARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _pg_reachable() -> str | None:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_PG_PROBLEM = _pg_reachable()


def pytest_report_header(config: pytest.Config) -> str:
    """Say loudly, at the top of every run, whether PostgreSQL tests run."""
    if _PG_PROBLEM is None:
        return f"PostgreSQL: reachable at {make_url(PG_DSN).render_as_string(hide_password=True)}"
    return (
        "!!! PostgreSQL NOT REACHABLE at "
        f"{make_url(PG_DSN).render_as_string(hide_password=True)} ({_PG_PROBLEM}): "
        "PostgreSQL tests are SKIPPED" + (" and this CI run FAILS" if IN_CI else "")
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI a missing PostgreSQL is an error, not a skip."""
    if _PG_PROBLEM is not None:
        message = f"PostgreSQL is not reachable ({_PG_PROBLEM}); set MICBOARD_TEST_PG_DSN"
        print(f"\n!!! {message}\n", file=sys.stderr)
        if IN_CI:
            raise pytest.UsageError(f"{message} (CI=true requires it)")
        warnings.warn(message, stacklevel=1)


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Take out the stderr handler a test's ``configure_logging()`` installed, when it ends.

    That handler writes to the stderr pytest captured for the test, closed afterwards: left in
    place, every later log record prints a "Logging error" traceback, slowly, in later tests.
    """
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """One nats-server with JetStream for the whole session, on free ports with its own store."""
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("nats-store"))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def nats_private(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of this test alone, for tests that stop or kill it."""
    server = EmbeddedNats(store_dir=tmp_path / "nats-store")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file in this test's temp directory."""
    return f"sqlite+aiosqlite:///{tmp_path / 'micboard.db'}"


def _pg_admin(sql: str) -> None:
    # Run on a thread of its own so that it works from inside a running event loop too.
    async def run() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the real server, dropped afterwards."""
    if _PG_PROBLEM is not None:
        pytest.skip(f"PostgreSQL not reachable: {_PG_PROBLEM}")
    name = f"micboard_test_{secrets.token_hex(6)}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    url = make_url(PG_DSN).set(drivername="postgresql+asyncpg", database=name)
    yield url.render_as_string(hide_password=False)
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'micboard.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine with the schema migrated to head, on each database (so migrations are tested on both)."""
    eng = create_engine(db_url)
    await upgrade(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
async def api(engine: AsyncEngine, nats_server: EmbeddedNats) -> AsyncIterator[LiveApi]:
    """The app client: the collector's HTTP API on a real port (SQLite and PostgreSQL), a token per role."""
    async for live in start_api(engine, nats_server.url):
        yield live
