"""Statements compiled once and run for many rows through the driver."""

from __future__ import annotations

from sqlalchemy import bindparam, delete, update
from sqlalchemy.dialects import postgresql, sqlite

from micboard.collector.store.prepared import prepare
from micboard.collector.store.schema import devices


def test_rows_become_the_positional_parameters_of_each_dialect() -> None:
    statement = update(devices).where(devices.c.id == bindparam("_pk")).values(name=bindparam("_name"))
    lite = prepare(statement, sqlite.dialect(), prefix="_")
    assert lite.sql.count("?") == 2
    assert lite.parameters({"name": "rack A", "pk": 7, "unused": 1}) == ("rack A", 7)
    pg = prepare(statement, postgresql.asyncpg.dialect(), prefix="_")  # type: ignore[no-untyped-call]
    assert "$1" in pg.sql and "$2" in pg.sql
    assert pg.parameters({"name": "rack A", "pk": 7}) == ("rack A", 7)


def test_one_parameter_still_makes_a_tuple() -> None:
    prepared = prepare(delete(devices).where(devices.c.id == bindparam("id")), sqlite.dialect())
    assert prepared.parameters({"id": 5}) == (5,)
