"""SQLite's WAL is checkpointed by a task of the collector's, not by the committing writer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector import app as app_module
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import checkpoint_wal, create_engine
from micboard.shared.natsd import EmbeddedNats


async def test_checkpoint_wal_copies_the_wal_and_the_backstop_pragma_applies(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}", wal_autocheckpoint=0)
    try:
        async with engine.begin() as conn:
            pages = (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar()
            assert pages == 0  # SQLite would never checkpoint by itself now
            await conn.execute(text("CREATE TABLE t (x TEXT)"))
            await conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "y" * 500}] * 200)
        busy, frames, done = await checkpoint_wal(engine)
        assert busy == 0 and frames > 0 and done == frames
        # A second one has nothing left to copy.
        assert (await checkpoint_wal(engine))[2] == frames
    finally:
        await engine.dispose()
    plain = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    try:
        async with plain.connect() as conn:
            assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 1000
    finally:
        await plain.dispose()


async def test_the_collector_checkpoints_in_the_background_only_on_sqlite(
    nats_private: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    collector_settings: Callable[..., CollectorSettings],
) -> None:
    # The real checkpoint, observed: what each run found in the WAL and copied.
    runs: list[tuple[int, int, int]] = []

    async def observed(engine: AsyncEngine) -> tuple[int, int, int]:
        result = await checkpoint_wal(engine)
        runs.append(result)
        return result

    monkeypatch.setattr(app_module, "checkpoint_wal", observed)
    settings = collector_settings(nats_private.url, sqlite_checkpoint_interval_s=0.05)
    collector = Collector(settings)
    await collector.start()
    try:
        names = {task.get_name() for task in collector._periodic}
        assert "wal-checkpoint" in names
        engine = collector._engine
        assert engine is not None
        async with engine.begin() as conn:
            assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 16_384
            await conn.execute(text("CREATE TABLE scratch (x TEXT)"))
            await conn.execute(text("INSERT INTO scratch VALUES (:x)"), [{"x": "z" * 500}] * 200)
        deadline = time.monotonic() + 10
        # Our 200 rows reached the WAL, and a background run copied all of it into the file.
        while not any(frames >= 20 and done == frames for _busy, frames, done in runs):
            assert time.monotonic() < deadline, f"the WAL was never checkpointed: {runs[-5:]}"
            await asyncio.sleep(0.05)
    finally:
        await collector.stop()
    off = Collector(settings.model_copy(update={"sqlite_checkpoint_interval_s": 0.0}))
    await off.start()
    try:
        assert "wal-checkpoint" not in {task.get_name() for task in off._periodic}
    finally:
        await off.stop()
