"""The async engine: SQLite (WAL, synchronous=NORMAL) by default, PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from micboard.collector.store.schema import metadata


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while ingest writes; NORMAL is durable across process crashes
    # (only an OS crash can lose the last transactions), which the at-least-once stream covers.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: str, *, echo: bool = False, wal_autocheckpoint: int | None = None) -> AsyncEngine:
    """Create the async engine for ``url``, preparing SQLite files and pragmas.

    ``wal_autocheckpoint``: SQLite's automatic checkpoint threshold in pages (its default is
    1000), for a caller that checkpoints on its own and keeps this only as a backstop.
    """
    parsed = make_url(url)
    # aiosqlite logs every statement with its parameters at DEBUG: webhook secrets, token hashes.
    # Nothing of it helps an operator, so a collector run at DEBUG never lets it through.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # Every ingested device event writes its device's state as JSON: orjson keeps that cheap.
    json_options: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=echo, **json_options)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        if wal_autocheckpoint is not None:
            pages = int(wal_autocheckpoint)
            event.listen(
                engine.sync_engine,
                "connect",
                lambda dbapi_connection, _record: dbapi_connection.execute(
                    f"PRAGMA wal_autocheckpoint={pages}"
                ),
            )
        return engine
    return create_async_engine(
        url, echo=echo, pool_size=10, max_overflow=10, pool_pre_ping=True, **json_options
    )


_WRITE_TURNS: weakref.WeakKeyDictionary[Engine, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def write_turn(engine: AsyncEngine) -> AbstractAsyncContextManager[Any]:
    """Hold around a write transaction on ``engine``: on SQLite, one at a time in this process.

    SQLite has one write lock, and a transaction that finds it taken sleeps in its busy handler
    (1, 2, 5, ... up to 100 ms at a time) before trying again: two writers of one process,
    such as ingest and the history flush, then each waited tens of milliseconds for a lock held
    for a few. Queued here instead, a writer starts the moment the one before it commits.
    Taken by the transactions that write from their first statement (ingest's batches, the
    history flush, the stale check, the dedup prune); one that mostly reads, such as the alert
    sweep, takes SQLite's lock only if it writes, and only for that long.
    PostgreSQL locks rows, not the database: no turn is taken.
    """
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    loop = asyncio.get_running_loop()
    held = _WRITE_TURNS.get(engine.sync_engine)
    if held is None or held[0] is not loop:
        held = _WRITE_TURNS[engine.sync_engine] = (loop, asyncio.Lock())
    return held[1]


async def checkpoint_wal(engine: AsyncEngine) -> tuple[int, int, int]:
    """Copy what the WAL holds into the database file without blocking writers or readers.

    A PASSIVE checkpoint: it stops at frames a reader still needs and the next one goes on from
    there. Run on a connection (and so a thread) of its own, its fsync never holds up a commit.
    Returns SQLite's ``(busy, frames in the WAL, frames checkpointed)``.
    """
    async with engine.connect() as conn:
        row: Any = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")).first()
    return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))


async def create_schema(engine: AsyncEngine) -> None:
    """Create any missing tables straight from the models, for tools and tests.

    A collector's database is created and upgraded by the migrations (``store/migrate.py``).
    """
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
