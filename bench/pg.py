"""A scratch PostgreSQL database for a benchmark run, created on the server the tests use."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy.engine import make_url

PG_DSN = os.environ.get("MICBOARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
"""The server (and its default database) to create scratch databases on."""


async def pg_admin(sql: str) -> None:
    """Run one statement on the PostgreSQL server's default database."""
    conn = await asyncpg.connect(PG_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A new, empty database for one run (its SQLAlchemy asyncpg URL); dropped afterwards."""
    name = f"micboard_bench_{secrets.token_hex(4)}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(PG_DSN).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
