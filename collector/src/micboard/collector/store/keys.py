"""Lookups by composite key that use the key's index on every database."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import ColumnElement, String, and_, any_, bindparam, func, select, tuple_
from sqlalchemy.dialects import postgresql


def composite_in(
    columns: Sequence[ColumnElement[Any]], keys: Iterable[Sequence[Any]], dialect: str | None = None
) -> ColumnElement[bool]:
    """``(columns) IN keys``, with ``columns[0] IN (its values)`` beside it.

    SQLite does not use an index for a row-value ``IN`` alone: it scans the whole table (or, in
    a join, the other table) and tests each row. The single-column ``IN`` on the index's first
    column lets it search the index instead; the row-value test then only filters what it found.
    Given the ``dialect``, the keys go as one bound parameter (see :func:`ints_in`): a JSON text
    on SQLite, one array per column on PostgreSQL; else as an ``IN`` list.
    """
    wanted = [tuple(key) for key in keys]
    firsts = sorted({key[0] for key in wanted})
    if dialect == "sqlite":
        rows = _json_each(wanted)
        parts = [func.json_extract(rows.c.value, f"$[{i}]") for i in range(len(columns))]
        return and_(columns[0].in_(select(_json_each(firsts).c.value)), tuple_(*columns).in_(select(*parts)))
    if dialect == "postgresql":
        arrays = [
            bindparam(None, [key[i] for key in wanted], type_=postgresql.ARRAY(column.type))
            for i, column in enumerate(columns)
        ]
        names = [f"k{i}" for i in range(len(columns))]
        table = func.unnest(*arrays).table_valued(*names).render_derived()
        return tuple_(*columns).in_(select(*(table.c[name] for name in names)))
    return and_(columns[0].in_(firsts), tuple_(*columns).in_(wanted))


def _json_each(values: Sequence[Any]) -> Any:
    """SQLite's ``json_each`` over ``values`` passed as one JSON text parameter."""
    return func.json_each(bindparam(None, orjson.dumps(values).decode(), type_=String)).table_valued("value")


def ints_in(column: ColumnElement[Any], values: Iterable[int], dialect: str) -> ColumnElement[bool]:
    """:func:`values_in` of integers (``column`` holds integers)."""
    return values_in(column, {int(value) for value in values}, dialect)


def values_in(column: ColumnElement[Any], values: Iterable[Any], dialect: str) -> ColumnElement[bool]:
    """``column IN values`` as one bound parameter, whatever the number of values.

    An ``IN`` list renders one placeholder per value, so each batch size is a new SQL text for
    the database to parse and plan (a few milliseconds for hundreds of values on SQLite). Passed
    as one JSON text (SQLite's ``json_each``) or one array (PostgreSQL's ``= ANY``), the text
    stays the same and the database's statement cache holds it.
    """
    wanted = sorted(set(values))
    if dialect == "sqlite":
        return column.in_(select(_json_each(wanted).c.value))
    if dialect == "postgresql":
        return column == any_(bindparam(None, wanted, type_=postgresql.ARRAY(column.type)))
    return column.in_(wanted)
