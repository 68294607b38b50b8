"""HistoryService edges: refused bucket size, skipped readings, the real clock, a failing periodic flush."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.waiting import until

from micboard.collector.services.history import HistoryService
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.envelope import MeterBody
from micboard.shared.model import ChannelMeter

HOUR = 3_600_000


def traceback_of(record: logging.LogRecord) -> str:
    """The record's traceback: still attached, or already rendered (and redacted) by the log filter."""
    if record.exc_info:
        return logging.Formatter().formatException(record.exc_info)
    return str(getattr(record, "exc", ""))


def test_bucket_must_be_at_least_one_second(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    with pytest.raises(ValueError, match="bucket_s must be at least 1"):
        HistoryService(engine, bucket_s=0)


async def test_unknown_readings_are_skipped_and_the_clock_is_real(engine: AsyncEngine) -> None:
    history = HistoryService(engine)
    before = time.time_ns() // 1_000_000
    # Channel 2 reports neither percent nor bars: nothing to sample.
    history.record_battery("venue", "pi-1", "dev-1", [(1, 80, 4), (2, None, None), (3, None, 2)])
    # Channel 2 has no level at all; channel 1 has only an unknown antenna but audio.
    history.record_meter(
        "venue",
        "pi-1",
        MeterBody(
            device_key="dev-1",
            channels=(
                ChannelMeter(index=1, rf_dbm=(None, None), audio_dbfs=-12.0),
                ChannelMeter(index=2, rf_dbm=(None,)),
            ),
        ),
    )
    after = time.time_ns() // 1_000_000
    assert history.pending == 2 and history.stats.recorded == 3 and history.stats.dropped == 0
    assert await history.flush() == 2
    assert await history.flush() == 0  # nothing pending: no statement at all
    points = {
        channel: await history.query("pi-1", "dev-1", channel, start_ms=before - HOUR, end_ms=after + HOUR)
        for channel in (1, 2, 3)
    }
    [one] = points[1]
    assert (one.battery_percent, one.battery_bars, one.audio_dbfs, one.rf_dbm) == (80, 4, -12.0, None)
    assert one.samples == 2 and before - 60_000 < one.bucket_ms <= after
    assert points[2] == []
    [three] = points[3]
    assert (three.battery_percent, three.battery_bars, three.samples) == (None, 2, 1)


async def test_periodic_flush_failure_is_counted_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A database without the schema: every flush fails, as when the store is away.
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    history = HistoryService(broken, flush_interval_s=0.02, prune_interval_s=3600)
    try:
        with caplog.at_level(logging.ERROR, logger="micboard.collector.services.history"):
            history.record_battery("venue", "pi-1", "dev-1", [(1, 50, 3)], now_ms=60_000)
            await history.start()
            await history.start()  # idempotent
            history.record_battery("venue", "pi-1", "dev-1", [(1, 40, 2)], now_ms=1)
            await until(lambda: history.stats.failed_flushes >= 2)
        assert history.stats.flushed_rows == 0
        logged = [r for r in caplog.records if r.getMessage() == "history flush or prune failed"]
        assert len(logged) >= 2 and all("no such table" in traceback_of(r) for r in logged)
        assert history._task is not None and not history._task.done()
        # The failed aggregates are kept for the next flush (bounded like recording is)...
        assert history.pending == 2
        # ...which stores them once the store is back.
        await upgrade(broken)
        await until(lambda: history.stats.flushed_rows == 2)
        assert history.pending == 0
    finally:
        task = history._task
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        history._task = None
        await history.close()  # no task, nothing pending: a no-op
        await broken.dispose()


async def test_periodic_prune_waits_for_its_interval(engine: AsyncEngine) -> None:
    history = HistoryService(engine, flush_interval_s=0.02, prune_interval_s=3600, retention_days=1)
    now = time.time_ns() // 1_000_000
    history.record_battery("venue", "pi-1", "dev-1", [(1, 50, 3)], now_ms=now - 3 * 86_400_000)
    await history.start()
    try:
        # First interval: flush, then prune at once (the old row goes).
        await until(lambda: history.stats.pruned_rows == 1)
        # Later intervals flush but do not prune again before the prune interval.
        history.record_battery("venue", "pi-1", "dev-1", [(1, 50, 3)], now_ms=now - 3 * 86_400_000)
        await until(lambda: history.stats.flushed_rows == 2)
        await asyncio.sleep(0.1)
        assert history.stats.pruned_rows == 1
    finally:
        await history.close()
    rows = await history.query("pi-1", "dev-1", 1, start_ms=now - 4 * 86_400_000, end_ms=now + HOUR)
    assert len(rows) == 1 and rows[0].battery_percent == 50


def test_battery_beyond_the_pending_bound_is_dropped_and_counted(tmp_path: Path) -> None:
    history = HistoryService(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"), max_pending=1)
    history.record_battery("venue", "pi-1", "dev-1", [(1, 50, 3), (2, 60, 4)], now_ms=0)
    # The same channel and bucket folds into the aggregate already waiting: not a new one.
    history.record_battery("venue", "pi-1", "dev-1", [(1, 45, 3)], now_ms=1)
    assert (history.pending, history.stats.recorded, history.stats.dropped) == (1, 2, 1)


async def test_a_failed_flush_keeps_its_aggregates_within_the_bound(tmp_path: Path) -> None:
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    history = HistoryService(broken, max_pending=3)
    try:
        history.record_battery("venue", "pi-1", "dev-1", [(1, 50, 3), (2, 60, 4)], now_ms=1)
        flush = asyncio.create_task(history.flush())
        await asyncio.sleep(0)  # the flush took what was pending and waits for the database
        assert history.pending == 0
        history.record_battery("venue", "pi-1", "dev-1", [(1, 45, 3), (3, 70, 4), (4, 80, 5)], now_ms=2)
        with pytest.raises(Exception, match="no such table"):
            await flush
        # Folded back into what arrived meanwhile, within the bound: channel 1 merged (lowest
        # reading, both samples); channel 2 found no room and is counted as dropped.
        assert history.pending == 3 and history.stats.dropped == 1
        await upgrade(broken)
        # Put back, they are still shown before they are stored, and once only.
        kept = await history.query("pi-1", "dev-1", 1, start_ms=0, end_ms=60_000)
        assert [(p.battery_percent, p.samples) for p in kept] == [(45, 2)]
        assert await history.flush() == 3
        points = {
            ch: await history.query("pi-1", "dev-1", ch, start_ms=0, end_ms=60_000) for ch in (1, 2, 3, 4)
        }
        assert [(p.battery_percent, p.samples) for p in points[1]] == [(45, 2)]
        assert points[2] == []
        assert [(p.battery_percent, p.samples) for p in points[3]] == [(70, 1)]
        assert [(p.battery_percent, p.samples) for p in points[4]] == [(80, 1)]
    finally:
        await broken.dispose()


async def test_a_flush_writes_in_paced_chunks(engine: AsyncEngine) -> None:
    history = HistoryService(engine)
    # More aggregates than one chunk holds: three transactions, with pauses between them.
    for channel in range(1, 1002):
        history.record_battery("venue", "pi-1", "dev-1", [(channel, 50, 3)], now_ms=60_000)
    history.record_battery("venue", "pi-1", "dev-1", [(1, 40, 2)], now_ms=60_001)
    assert await history.flush(spread_s=0.03) == 1001
    assert (history.pending, history.stats.flushed_rows) == (0, 1001)
    points = await history.query("pi-1", "dev-1", 1, start_ms=60_000, end_ms=120_000)
    assert [(p.battery_percent, p.samples) for p in points] == [(40, 2)]
    last = await history.query("pi-1", "dev-1", 1001, start_ms=60_000, end_ms=120_000)
    assert [(p.battery_percent, p.samples) for p in last] == [(50, 1)]
