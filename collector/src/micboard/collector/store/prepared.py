"""Hot statements compiled once per dialect and run for many rows straight through the driver."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement's SQL text for one dialect and the getter turning a row into its parameters."""

    sql: str
    parameters: Callable[[Mapping[str, Any]], tuple[Any, ...]]

    async def executemany(
        self, conn: AsyncConnection, rows: Sequence[Mapping[str, Any]], *, write_locked: bool = False
    ) -> None:
        """Run the statement once per row in ``rows``.

        ``write_locked``: the caller's transaction already holds SQLite's write lock (see
        :func:`write_locked_sqlite`).
        """
        parameters = [self.parameters(row) for row in rows]
        db = await write_locked_sqlite(conn) if write_locked else None
        if db is not None:
            db.executemany(self.sql, parameters)
        else:
            await conn.exec_driver_sql(self.sql, parameters)


async def write_locked_sqlite(conn: AsyncConnection) -> sqlite3.Connection | None:
    """SQLite's own connection under ``conn``, to run a statement on the calling thread; else ``None``.

    Only for a transaction that already holds SQLite's write lock (it wrote before): such a
    statement waits for no lock and costs SQLite's work alone, a few milliseconds for a batch's
    rows. Handed to the driver's thread instead, it cost more than that work: a hand-off each
    way, and a statement run for many rows takes the interpreter's lock back after each row,
    waiting up to the switch interval (5 ms) whenever the event loop is busy meanwhile
    (docs/adr/0008). ``None`` on PostgreSQL, or when the driver is not aiosqlite.
    """
    if conn.dialect.name != "sqlite":
        return None
    raw = await conn.get_raw_connection()
    try:
        # aiosqlite keeps the sqlite3 connection its thread runs; one opened with
        # check_same_thread=False, and used here only while this transaction owns it.
        db = raw.driver_connection._conn  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        return None
    return db if isinstance(db, sqlite3.Connection) else None


def prepare(statement: ClauseElement, dialect: Dialect, *, prefix: str = "") -> Prepared:
    """Compile ``statement`` for ``dialect``; a parameter named ``prefix + key`` takes a row's ``key``.

    SQLAlchemy's per-row parameter processing costs more than the database's work for the
    statements that run for every event or every sample, so their rows go to the driver as
    tuples. Values must already be what the driver takes (JSON serialized by the caller).
    An UPDATE cannot bind a column's own name, hence ``prefix``.
    """
    compiled = statement.compile(dialect=dialect)
    if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:  # pragma: no cover
        # Both supported dialects compile SQL that binds by position.
        raise NotImplementedError(f"{dialect.name} does not bind parameters by position")
    names = tuple(name.removeprefix(prefix) for name in compiled.positiontup)
    if len(names) == 1:
        # itemgetter of one name returns a bare value, not a 1-tuple.
        only = names[0]
        return Prepared(str(compiled), lambda row: (row[only],))
    return Prepared(str(compiled), itemgetter(*names))
