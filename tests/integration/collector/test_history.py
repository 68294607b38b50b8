"""HistoryService on SQLite and PostgreSQL: downsampling, re-bucketed queries, retention."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import CollectorErrorCode, InvalidHistoryQueryError
from micboard.collector.services.history import FLUSH_CHUNK, HistoryPoint, HistoryService
from micboard.collector.store.schema_alerts import history_samples
from micboard.shared.envelope import MeterBody
from micboard.shared.model import ChannelMeter, Device, Family, ReceiverChannel, Transmitter, Vendor

T0 = 1_700_000_040_000 - 1_700_000_040_000 % 3_600_000  # on the hour
MIN = 60_000


def meter(rf: tuple[float | None, ...], audio: float | None = -30.0, peak: float | None = -10.0) -> MeterBody:
    return MeterBody(
        device_key="dev-1",
        channels=(ChannelMeter(index=1, rf_dbm=rf, audio_dbfs=audio, audio_peak_dbfs=peak),),
    )


def device(bars: int, percent: int | None = None) -> Device:
    return Device(
        device_key="dev-1",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(
            ReceiverChannel(index=1, transmitter=Transmitter(battery_bars=bars, battery_percent=percent)),
            ReceiverChannel(index=2),
        ),
    )


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(history_samples))).scalar_one())


async def test_one_row_per_channel_per_minute_with_aggregates(engine: AsyncEngine) -> None:
    history = HistoryService(engine)
    for second in range(0, 60, 2):  # 30 meters in one minute, best antenna varies
        history.record_meter("venue", "pi-1", meter((-70.0 - second / 2, -80.0)), now_ms=T0 + second * 1000)
    history.record_meter("venue", "pi-1", meter((None, None), audio=-3.0, peak=-0.5), now_ms=T0 + 59_000)
    history.record_device("venue", "pi-1", device(4, 70), now_ms=T0 + 10_000)
    history.record_device("venue", "pi-1", device(3, 55), now_ms=T0 + 50_000)
    assert history.pending == 1  # channel 2 has no transmitter and no meter
    assert await history.flush() == 1
    # A second flush of the same minute (another collector, or the rest of the minute) merges.
    history.record_meter("venue", "pi-1", meter((-50.0,), audio=-40.0, peak=-20.0), now_ms=T0 + 59_500)
    history.record_device("venue", "pi-1", device(5, 90), now_ms=T0 + 59_900)
    await history.flush()
    assert await count(engine) == 1
    [point] = await history.query("pi-1", "dev-1", 1, start_ms=T0, end_ms=T0 + MIN)
    assert point.bucket_ms == T0
    assert (point.battery_bars, point.battery_percent) == (3, 55)  # the worst battery of the minute
    assert (point.rf_dbm, point.rf_dbm_min) == (-50.0, -80.0)  # RF envelope of the best antenna
    assert (point.audio_dbfs, point.audio_peak_dbfs) == (-3.0, -0.5)  # the loudest
    assert point.samples == 30 + 1 + 2 + 1 + 1


async def test_query_rebuckets_and_bounds(engine: AsyncEngine) -> None:
    history = HistoryService(engine)
    for minute in range(10):
        history.record_meter("venue", "pi-1", meter((-60.0 - minute,)), now_ms=T0 + minute * MIN + 5000)
        history.record_device("venue", "pi-1", device(5 - minute // 2), now_ms=T0 + minute * MIN + 5000)
    await history.flush()
    assert await count(engine) == 10
    points = await history.query("pi-1", "dev-1", 1, start_ms=T0, end_ms=T0 + 10 * MIN, resolution_s=300)
    assert [p.bucket_ms for p in points] == [T0, T0 + 5 * MIN]
    assert [(p.rf_dbm, p.rf_dbm_min) for p in points] == [(-60.0, -64.0), (-65.0, -69.0)]
    assert [p.battery_bars for p in points] == [3, 1]
    assert [p.samples for p in points] == [10, 10]
    window = await history.query("pi-1", "dev-1", 1, start_ms=T0 + 2 * MIN, end_ms=T0 + 4 * MIN)
    assert [p.bucket_ms for p in window] == [T0 + 2 * MIN, T0 + 3 * MIN]
    assert await history.query("pi-1", "dev-1", 2, start_ms=T0, end_ms=T0 + 10 * MIN) == []
    for bad in (
        {"start_ms": T0, "end_ms": T0},
        {"start_ms": T0, "end_ms": T0 + MIN, "resolution_s": 90},
        {"start_ms": T0, "end_ms": T0 + MIN, "resolution_s": 30},
        {"start_ms": 0, "end_ms": T0},
    ):
        with pytest.raises(InvalidHistoryQueryError) as info:
            await history.query("pi-1", "dev-1", 1, **bad)
        assert info.value.code == CollectorErrorCode.HISTORY_INVALID_QUERY


async def test_retention_prunes_old_rows(engine: AsyncEngine) -> None:
    history = HistoryService(engine, retention_days=30)
    day = 86_400_000
    for age_days in (40, 31, 29, 1):
        history.record_meter("venue", "pi-1", meter((-60.0,)), now_ms=T0 - age_days * day)
    await history.flush()
    assert await history.prune(T0) == 2
    assert await history.prune(T0) == 0
    assert await count(engine) == 2
    assert history.stats.pruned_rows == 2


async def test_pending_bound_counts_drops_and_periodic_task(engine: AsyncEngine) -> None:
    history = HistoryService(engine, max_pending=2, flush_interval_s=0.05)
    now = time.time_ns() // 1_000_000  # the periodic job prunes against the real clock
    for minute in range(4):
        # Ended buckets: the periodic flush leaves the current one filling.
        history.record_meter("venue", "pi-1", meter((-60.0,)), now_ms=now - (minute + 1) * MIN)
    assert (history.pending, history.stats.dropped) == (2, 2)
    await history.start()
    try:
        for _ in range(100):
            if history.pending == 0 and await count(engine) == 2:
                break
            await asyncio.sleep(0.02)
        assert await count(engine) == 2
    finally:
        await history.close()
    assert history._task is None


async def test_a_query_shows_what_is_not_written_yet(engine: AsyncEngine) -> None:
    """The current minute is on the chart at once, and flushing it changes nothing shown."""
    history = HistoryService(engine)
    history.record_meter("venue", "pi-1", meter((-60.0,)), now_ms=T0 + 5_000)
    history.record_device("venue", "pi-1", device(4, 70), now_ms=T0 + 6_000)
    await history.flush()  # minute 0 stored
    history.record_meter("venue", "pi-1", meter((-50.0,), audio=-20.0), now_ms=T0 + 30_000)  # minute 0 again
    history.record_meter("venue", "pi-1", meter((-65.0,)), now_ms=T0 + MIN + 1_000)  # minute 1, pending
    history.record_device("venue", "pi-1", device(3, 40), now_ms=T0 + MIN + 2_000)
    history.record_meter("venue", "pi-1", meter((-40.0,)), now_ms=T0 + 3 * MIN)  # outside the range
    assert await count(engine) == 1

    def shown(points: list[HistoryPoint]) -> list[tuple[int, int | None, float | None, float | None, int]]:
        return [(p.bucket_ms, p.battery_percent, p.rf_dbm, p.rf_dbm_min, p.samples) for p in points]

    before = await history.query("pi-1", "dev-1", 1, start_ms=T0, end_ms=T0 + 2 * MIN)
    assert shown(before) == [(T0, 70, -50.0, -60.0, 3), (T0 + MIN, 40, -65.0, -65.0, 2)]
    coarse = await history.query("pi-1", "dev-1", 1, start_ms=T0, end_ms=T0 + 5 * MIN, resolution_s=300)
    assert shown(coarse) == [(T0, 40, -40.0, -65.0, 6)]
    assert await history.query("pi-1", "dev-1", 2, start_ms=T0, end_ms=T0 + 2 * MIN) == []
    await history.flush()
    assert shown(await history.query("pi-1", "dev-1", 1, start_ms=T0, end_ms=T0 + 2 * MIN)) == shown(before)


async def test_a_query_during_a_flush_shows_the_chunks_not_written_yet(engine: AsyncEngine) -> None:
    """Aggregates a flush has taken but not stored yet stay on the chart (chunks pause between)."""
    history = HistoryService(engine)
    devices = -(-(FLUSH_CHUNK + 10) // 8)  # two chunks of eight-channel devices, a pause between
    for n in range(devices):
        body = MeterBody(
            device_key=f"dev-{n}",
            channels=tuple(ChannelMeter(index=i, rf_dbm=(-60.0 - i,)) for i in range(1, 9)),
        )
        history.record_meter("venue", "pi-1", body, now_ms=T0 + 1_000)
    flush = asyncio.create_task(history.flush(spread_s=2.0))
    for _ in range(500):  # until the first chunk is committed: the flush pauses before the next
        if await count(engine):
            break
        await asyncio.sleep(0.01)
    assert not flush.done()
    last = await history.query("pi-1", f"dev-{devices - 1}", 8, start_ms=T0, end_ms=T0 + MIN)
    assert [(p.rf_dbm, p.samples) for p in last] == [(-68.0, 1)]
    first = await history.query("pi-1", "dev-0", 1, start_ms=T0, end_ms=T0 + MIN)
    assert [(p.rf_dbm, p.samples) for p in first] == [(-61.0, 1)]  # stored, counted once
    assert await flush == devices * 8
    assert await count(engine) == devices * 8
