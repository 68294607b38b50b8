"""Alembic environment: runs migrations on the connection :mod:`micboard.collector.store.migrate` hands in.

There is no ``alembic.ini``: the configuration is built in code, and the caller opens the
(async) engine and passes a synchronous connection through ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from micboard.collector.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "run migrations through micboard-collector migrate (or micboard.collector.store.migrate)"
        )
    _run(connection)


_main()
