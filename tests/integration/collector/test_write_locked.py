"""Statements of a transaction holding SQLite's write lock run on SQLite's own connection."""

from __future__ import annotations

import sqlite3

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.store.prepared import prepare, write_locked_sqlite
from micboard.collector.store.schema import sites


async def test_the_driver_connection_is_found_on_sqlite_and_not_on_postgresql(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        db = await write_locked_sqlite(conn)
        if engine.dialect.name == "sqlite":
            assert isinstance(db, sqlite3.Connection)
        else:
            assert db is None


async def test_rows_written_on_the_driver_connection_commit_and_roll_back_with_the_transaction(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sites.insert(), [{"site": f"s{n}", "first_seen_ms": n, "last_seen_ms": 0} for n in range(3)]
        )
    statement = prepare(
        update(sites).where(sites.c.site == bindparam("_site")).values(last_seen_ms=bindparam("_seen")),
        engine.dialect,
        prefix="_",
    )
    async with engine.begin() as conn:
        await statement.executemany(
            conn, [{"site": "s0", "seen": 10}, {"site": "s1", "seen": 11}], write_locked=True
        )
        # The same transaction reads what was written, whichever connection object wrote it.
        assert (
            await conn.execute(select(sites.c.last_seen_ms).where(sites.c.site == "s1"))
        ).scalar_one() == 11
    rolled_back = False
    try:
        async with engine.begin() as conn:
            await statement.executemany(conn, [{"site": "s2", "seen": 12}], write_locked=True)
            raise RuntimeError("abandon")
    except RuntimeError:
        rolled_back = True
    assert rolled_back
    async with engine.connect() as conn:
        seen = {
            row.site: row.last_seen_ms
            for row in await conn.execute(select(sites.c.site, sites.c.last_seen_ms))
        }
    assert seen == {"s0": 10, "s1": 11, "s2": 0}


async def test_a_closed_driver_connection_is_not_used(engine: AsyncEngine) -> None:
    if engine.dialect.name != "sqlite":
        return
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        real = driver._connection  # type: ignore[union-attr]
        driver._connection = None  # type: ignore[union-attr]
        try:
            assert await write_locked_sqlite(conn) is None
        finally:
            driver._connection = real  # type: ignore[union-attr]
        await conn.execute(text("SELECT 1"))
