"""The INSERT of a table with ``ON CONFLICT``, in the dialect of a connection."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """An insert into ``table`` that takes ``on_conflict_do_nothing`` / ``on_conflict_do_update``.

    Upserts are dialect-specific; both supported databases share the ON CONFLICT form.
    """
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {conn.dialect.name!r}")
