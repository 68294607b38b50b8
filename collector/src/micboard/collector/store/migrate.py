"""Schema migrations (Alembic, configured in code): upgrade, current revision, and the check at start."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import SchemaNotCurrentError
from micboard.collector.store.database import create_engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
AutoMigrate = Literal["empty-sqlite", "always", "never"]


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration of the packaged migrations; ``connection`` is what ``env.py`` runs on."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this build knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revision 0001
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


@dataclass(frozen=True, slots=True)
class MigrationState:
    """Where a database stands: its revision (``None`` if never migrated), the head, and emptiness."""

    current: str | None
    head: str
    empty: bool

    @property
    def at_head(self) -> bool:
        """Whether the database has every migration of this build."""
        return self.current == self.head


@asynccontextmanager
async def _engine(target: str | AsyncEngine) -> AsyncIterator[AsyncEngine]:
    if isinstance(target, AsyncEngine):
        yield target
        return
    engine = create_engine(target)
    try:
        yield engine
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)


def _state(connection: Connection) -> MigrationState:
    current = MigrationContext.configure(connection).get_current_revision()
    tables = inspect(connection).get_table_names()
    return MigrationState(current=current, head=head_revision(), empty=not tables)


async def upgrade(target: str | AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database at ``target`` (a URL or an engine) to ``revision``, in one transaction."""
    async with _engine(target) as engine, engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


async def downgrade(target: str | AsyncEngine, revision: str) -> None:
    """Downgrade the database at ``target`` to ``revision`` in one transaction (``"base"``: no tables)."""
    async with _engine(target) as engine, engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)


async def state(target: str | AsyncEngine) -> MigrationState:
    """The migration state of the database at ``target``."""
    async with _engine(target) as engine, engine.connect() as conn:
        return await conn.run_sync(_state)


async def current(target: str | AsyncEngine) -> str | None:
    """The revision the database at ``target`` is at, or ``None`` if it was never migrated."""
    return (await state(target)).current


async def check(target: str | AsyncEngine) -> bool:
    """Whether the database at ``target`` is at the head revision."""
    return (await state(target)).at_head


async def prepare(engine: AsyncEngine, auto_migrate: AutoMigrate) -> MigrationState:
    """Bring the database to head at start if ``auto_migrate`` allows it, else refuse a stale schema.

    ``empty-sqlite`` migrates only an empty SQLite database, so that the default install works
    with zero steps while a shared database is never changed behind its operator's back.
    """
    found = await state(engine)
    if found.at_head:
        return found
    sqlite = engine.dialect.name == "sqlite"
    if auto_migrate == "always" or (auto_migrate == "empty-sqlite" and found.empty and sqlite):
        log.info("migrating database", extra={"from": found.current or "empty", "to": found.head})
        await upgrade(engine)
        return await state(engine)
    where = engine.url.render_as_string(hide_password=True)
    raise SchemaNotCurrentError(
        f"database {where} is at revision {found.current or 'none'} but this build needs {found.head}; "
        "run `micboard-collector migrate` (back up the database first)"
    )
