"""Writers take turns on SQLite, and stopping lets the work in hand finish instead of cancelling it.

A job cancelled in the middle of a statement could leave its connection holding SQLite's write
lock; the history flush at stop then waited out the busy timeout and lost what was pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.app import Collector
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.history import FLUSH_CHUNK, HistoryService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine, write_turn
from micboard.collector.store.schema_alerts import history_samples
from micboard.shared.natsd import EmbeddedNats


async def stored_samples(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(history_samples))).scalar_one())


async def test_writers_take_turns_on_sqlite_and_not_on_postgresql(engine: AsyncEngine) -> None:
    order: list[str] = []
    first_in, second_in = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with write_turn(engine), engine.begin() as conn:
            order.append("first in")
            first_in.set()
            await conn.execute(text("UPDATE agents SET boot = 'x' WHERE agent = 'none'"))
            # Held until the second writer is in too; on SQLite, long enough to show it cannot be
            # (on PostgreSQL it is, once its connection is open: that may take a while when busy).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second_in.wait(), 0.5 if engine.dialect.name == "sqlite" else 30)
            order.append("first out")

    async def second() -> None:
        await first_in.wait()  # the first writer is in its transaction
        async with write_turn(engine), engine.begin() as conn:
            order.append("second in")
            second_in.set()
            await conn.execute(text("UPDATE agents SET boot = 'y' WHERE agent = 'none'"))

    await asyncio.gather(first(), second())
    if engine.dialect.name == "sqlite":
        # The second waited for the first to commit, in this process, without SQLite's busy sleeps.
        assert order == ["first in", "first out", "second in"]
    else:
        # PostgreSQL locks rows, not the database: nothing to queue for.
        assert order == ["first in", "second in", "first out"]


async def test_a_turn_belongs_to_one_event_loop(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'turns.db'}")

    async def take() -> None:
        async with write_turn(engine):
            await asyncio.sleep(0)

    # An engine used from a second loop (a CLI command after the service) gets a lock of that loop.
    await take()
    await asyncio.to_thread(asyncio.run, take())
    await take()
    await engine.dispose()


async def test_close_hurries_a_flush_in_progress_and_stores_everything(engine: AsyncEngine) -> None:
    history = HistoryService(engine)
    now = time.time_ns() // 1_000_000
    rows = 3 * FLUSH_CHUNK
    for device in range(rows // 4):
        history.record_battery("venue", "pi-1", f"rx-{device}", [(i, 60, 4) for i in range(1, 5)], now_ms=now)
    # Spread over ten minutes: three chunks with five minutes' pause between two.
    flushing = asyncio.create_task(history.flush(spread_s=600))
    deadline = time.monotonic() + 60
    while history.stats.flushed_rows < FLUSH_CHUNK:  # the first chunk is in: now in a pause
        assert time.monotonic() < deadline, "the first chunk was never written"
        await asyncio.sleep(0.01)
    await history.close()
    # The pauses end at close: the flush finishes now, not in ten minutes.
    assert await asyncio.wait_for(flushing, timeout=60) == rows
    assert await stored_samples(engine) == rows
    assert (history.pending, history.stats.failed_flushes) == (0, 0)


async def test_stop_lets_a_periodic_job_finish_its_run_then_flushes_history(
    nats_private: EmbeddedNats,
    collector_settings: Callable[..., CollectorSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = collector_settings(
        nats_private.url, alert_sweep_interval_s=0.05, sqlite_checkpoint_interval_s=0.01
    )
    runs: list[str] = []
    started = asyncio.Event()
    real_sweep = AlertService.sweep

    async def slow_sweep(self: AlertService, **kwargs: Any) -> Any:
        # A sweep that is sure to be in progress when stop() is called.
        runs.append("started")
        started.set()
        async with self.engine.begin() as conn:
            await conn.execute(text("SELECT count(*) FROM alerts"))
            await asyncio.sleep(0.5)
        found = await real_sweep(self, **kwargs)
        runs.append("finished")
        return found

    monkeypatch.setattr(AlertService, "sweep", slow_sweep)
    collector = Collector(settings)
    await collector.start()
    history = collector.history
    assert history is not None
    engine = collector.running.engine if collector.running else None
    assert engine is not None
    now = time.time_ns() // 1_000_000
    history.record_battery("venue", "pi-1", "rx", [(1, 40, 2), (2, 90, 5)], now_ms=now)
    await asyncio.wait_for(started.wait(), timeout=30)
    await collector.stop()
    # The sweep in hand ran to its end and no other began; what history held was stored.
    assert runs == ["started", "finished"]
    check = create_engine(settings.resolved_database_url())
    try:
        assert await stored_samples(check) == 2
    finally:
        await check.dispose()
