"""MeterService on the real store and NATS: history, alert evaluation, coalescing, failures, sharing."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.waiting import until

from micboard.collector.services.alerts import AlertRule, AlertService, AlertState
from micboard.collector.services.history import HistoryService
from micboard.collector.services.meters import METER_SUBJECTS, MeterService
from micboard.collector.store.database import create_engine
from micboard.collector.store.schema_alerts import history_samples
from micboard.shared.codec import encode
from micboard.shared.envelope import MeterBody, MeterEvent
from micboard.shared.model import ChannelMeter
from micboard.shared.natsd import EmbeddedNats

SITE, AGENT = "venue", "pi-1"


def traceback_of(record: logging.LogRecord) -> str:
    """The record's traceback: still attached, or already rendered (and redacted) by the log filter."""
    if record.exc_info:
        return logging.Formatter().formatException(record.exc_info)
    return str(getattr(record, "exc", ""))


def meter_event(device_key: str, *, peak: float, seq: int = 0) -> MeterEvent:
    return MeterEvent(
        site=SITE,
        agent=AGENT,
        boot="boot-1",
        seq=seq,
        ts=time.time_ns() // 1_000_000,
        body=MeterBody(
            device_key=device_key,
            channels=(ChannelMeter(index=1, rf_dbm=(-55.0, None), audio_dbfs=-20.0, audio_peak_dbfs=peak),),
        ),
    )


async def test_meters_feed_alerts_latest_wins_and_history_apart(engine: AsyncEngine) -> None:
    alerts = AlertService(engine)
    history = HistoryService(engine)
    meters = MeterService(alerts=alerts, history=history)
    # Before the task runs, a second meter of the same device replaces the first one waiting.
    meters.submit(meter_event("dev-1", peak=-30.0, seq=1))
    meters.submit(meter_event("dev-1", peak=-0.5, seq=2))
    meters.submit(meter_event("dev-2", peak=-30.0, seq=3))
    assert (meters.stats.received, meters.stats.superseded) == (3, 1)
    # The alert rules' meters are not history's: that comes from this process's share.
    assert history.pending == 0 and meters.stats.recorded == 0
    meters.record(meter_event("dev-1", peak=-30.0, seq=1))
    meters.record(meter_event("dev-2", peak=-30.0, seq=3))
    assert history.pending == 2 and meters.stats.recorded == 2
    await meters.start()
    await meters.start()  # idempotent: still one task
    try:
        await until(lambda: meters.stats.evaluated == 2)
        # Only the latest meter of dev-1 was evaluated: it clips, so the alert is open in the store.
        [alert] = await alerts.list_alerts(states=[AlertState.OPEN])
        assert alert.rule is AlertRule.AUDIO_CLIPPING and alert.device_key == "dev-1" and alert.value == -0.5
        assert meters.stats.failed == 0
    finally:
        await meters.close()
    assert meters._task is None
    # After close, a meter submitted waits for no evaluation.
    meters.submit(meter_event("dev-3", peak=-30.0))
    await meters.close()  # nothing waiting afterwards
    assert meters._pending == {} and meters.stats.evaluated == 2
    assert await history.flush() == 2


async def test_failed_evaluation_is_counted_and_the_task_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A database without the schema: every evaluation fails in the store, as when it is away.
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    meters = MeterService(alerts=AlertService(broken))
    await meters.start()
    try:
        with caplog.at_level(logging.ERROR, logger="micboard.collector.services.meters"):
            meters.submit(meter_event("dev-1", peak=-0.5))
            await until(lambda: meters.stats.failed == 1)
            meters.submit(meter_event("dev-1", peak=-0.5, seq=1))
            await until(lambda: meters.stats.failed == 2)
        assert meters.stats.evaluated == 0 and meters.stats.received == 2
        failures = [r for r in caplog.records if r.getMessage() == "meter alert evaluation failed"]
        assert len(failures) == 2 and all("no such table" in traceback_of(r) for r in failures)
        assert meters._task is not None and not meters._task.done()
    finally:
        await meters.close()
        await broken.dispose()


async def test_without_alerts_there_is_no_task_and_no_waiting_meter(engine: AsyncEngine) -> None:
    history = HistoryService(engine)
    meters = MeterService(history=history)
    await meters.start()
    assert meters._task is None
    meters.submit(meter_event("dev-1", peak=-0.5))
    assert meters.stats.received == 1 and meters._pending == {} and history.pending == 0
    await meters.close()
    bare = MeterService()
    bare.submit(meter_event("dev-1", peak=-10.0))
    bare.record(meter_event("dev-1", peak=-10.0))
    assert bare.stats.received == 1 and bare.stats.superseded == 0 and bare.stats.recorded == 0


async def test_collectors_share_the_meters_and_record_each_once(
    engine: AsyncEngine, nats_server: EmbeddedNats
) -> None:
    """Two collectors' meter services on one NATS: each meter is recorded in history by one of them."""
    services = [MeterService(history=HistoryService(engine)) for _ in range(2)]
    connections = [await nats.connect(nats_server.url) for _ in services]
    watcher = await nats.connect(nats_server.url)
    seen_by_watcher: list[Msg] = []

    async def watch(msg: Msg) -> None:
        seen_by_watcher.append(msg)

    try:
        # A plain subscriber, as each process's live feed: it still sees every meter.
        await watcher.subscribe(METER_SUBJECTS, cb=watch)
        await watcher.flush()
        for service, nc in zip(services, connections, strict=True):
            await service.start(nc)
            await service.start(nc)  # idempotent: one subscription
            await nc.flush()
        count = 200
        for seq in range(count):
            event = meter_event(f"dev-{seq % 10}", peak=-20.0 - seq % 7, seq=seq)
            await watcher.publish(f"micboard.v1.{SITE}.{AGENT}.meter", encode(event))
        # Garbage, and a meter that claims another agent than its subject: counted, not recorded.
        await watcher.publish(f"micboard.v1.{SITE}.{AGENT}.meter", b"\xc1 not msgpack")
        await watcher.publish(f"micboard.v1.{SITE}.pi-2.meter", encode(meter_event("dev-1", peak=-1.0)))
        await watcher.flush()
        await until(lambda: sum(s.stats.recorded + s.stats.bad for s in services) == count + 2)
        await until(lambda: len(seen_by_watcher) == count + 2)
        # Which member gets a meter is the server's choice (it may favour one for a while); with
        # two plain subscriptions instead of the queue group, the sum here would be twice as much.
        assert sum(s.stats.recorded for s in services) == count
        assert sum(s.stats.bad for s in services) == 2
        assert sum(s.stats.received for s in services) == 0  # the alert rules' meters come from the live feed
        for service in services:
            assert service.history is not None
            await service.history.flush()
        async with engine.connect() as connection:
            recorded = (await connection.execute(select(func.sum(history_samples.c.samples)))).scalar_one()
        assert recorded == count
    finally:
        for service in services:
            await service.close()
            await service.close()  # idempotent
        for nc in (*connections, watcher):
            await nc.close()


async def test_a_meter_that_cannot_be_recorded_is_counted_and_the_next_ones_are(
    engine: AsyncEngine,
    nats_server: EmbeddedNats,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    history = HistoryService(engine)
    service = MeterService(history=history)
    record = history.record_meter
    calls = 0

    def failing_once(site: str, agent: str, body: MeterBody) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("history is full of surprises")
        record(site, agent, body)

    monkeypatch.setattr(history, "record_meter", failing_once)
    nc = await nats.connect(nats_server.url)
    try:
        await service.start(nc)
        await nc.flush()
        with caplog.at_level(logging.ERROR, logger="micboard.collector.services.meters"):
            for seq in range(3):
                await nc.publish(
                    f"micboard.v1.{SITE}.{AGENT}.meter", encode(meter_event("dev-1", peak=-20.0, seq=seq))
                )
            await nc.flush()
            await until(lambda: calls == 3)
        assert service.stats.failed == 1 and service.stats.recorded == 2
        assert [r.getMessage() for r in caplog.records] == ["meter not recorded"]
        assert history.pending == 1  # the two later meters folded into one sample
    finally:
        await service.close()
        await nc.close()
