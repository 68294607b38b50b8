"""Lookups by composite key that use the key's index on every database."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, tuple_


def composite_in(columns: Sequence[ColumnElement[Any]], keys: Iterable[Sequence[Any]]) -> ColumnElement[bool]:
    """``(columns) IN keys``, with ``columns[0] IN (its values)`` beside it.

    SQLite does not use an index for a row-value ``IN`` alone: it scans the whole table (or, in
    a join, the other table) and tests each row. The single-column ``IN`` on the index's first
    column lets it search the index instead; the row-value test then only filters what it found.
    """
    wanted = [tuple(key) for key in keys]
    firsts = sorted({key[0] for key in wanted})
    return and_(columns[0].in_(firsts), tuple_(*columns).in_(wanted))
