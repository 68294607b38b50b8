"""Hot statements compiled once per dialect and run for many rows straight through the driver."""

from __future__ import annotations

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

    async def executemany(self, conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per row in ``rows``."""
        await conn.exec_driver_sql(self.sql, [self.parameters(row) for row in rows])


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
