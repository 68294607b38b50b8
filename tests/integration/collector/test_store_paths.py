"""Store edge paths: SQLite pragmas on a real file, the migrations environment run by its package name."""

from __future__ import annotations

import runpy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from micboard.collector.store import migrate
from micboard.collector.store.database import create_engine, create_schema

ENV_MODULE = "micboard.collector.store.migrations.env"


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_sqlite_file_engine_sets_pragmas_and_creates_parent(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "deeper" / "micboard.db"
    engine = create_engine(f"sqlite+aiosqlite:///{db_file}")
    try:
        assert db_file.parent.is_dir()
        async with engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            sync = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
            fks = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
            busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()
        assert str(journal).lower() == "wal"
        assert sync == 1  # NORMAL
        assert (fks, busy) == (1, 5000)
        await create_schema(engine)
        async with engine.connect() as conn:
            tables = (
                (await conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")))
                .scalars()
                .all()
            )
        assert "devices" in tables
    finally:
        await engine.dispose()


async def test_in_memory_sqlite_engine_creates_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    engine = create_engine("sqlite+aiosqlite:///:memory:")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 41 + 1"))).scalar_one() == 42
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
    finally:
        await engine.dispose()
    assert _entries(tmp_path) == []


def _environment(connection: Connection | None, revisions: list[str]) -> EnvironmentContext:
    config = migrate.alembic_config(connection)
    script = ScriptDirectory.from_config(config)

    def upgrade(rev: Any, _context: Any) -> Iterable[Any]:
        revisions.append("ran")
        return script._upgrade_revs("head", rev)

    return EnvironmentContext(config, script, fn=upgrade)


def test_migrations_env_refuses_to_run_without_a_connection() -> None:
    revisions: list[str] = []
    with _environment(None, revisions), pytest.raises(RuntimeError) as info:
        runpy.run_module(ENV_MODULE, run_name=ENV_MODULE)
    assert "micboard-collector migrate" in str(info.value)
    assert revisions == []


async def test_migrations_env_upgrades_the_connection_it_is_handed(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'env.db'}")
    revisions: list[str] = []

    def run(connection: Connection) -> None:
        with _environment(connection, revisions):
            runpy.run_module(ENV_MODULE, run_name=ENV_MODULE)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
        assert revisions == ["ran"]
        found = await migrate.state(engine)
        assert found.at_head and found.current == migrate.head_revision() and not found.empty
    finally:
        await engine.dispose()
