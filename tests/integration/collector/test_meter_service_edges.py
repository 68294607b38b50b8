"""MeterService on the real store: history, live hub and alert evaluation, coalescing and failures."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.live import LiveHub, Topic
from micboard.collector.services.alerts import AlertRule, AlertService, AlertState
from micboard.collector.services.history import HistoryService
from micboard.collector.services.meters import MeterService
from micboard.collector.store.database import create_engine
from micboard.shared.envelope import MeterBody, MeterEvent
from micboard.shared.model import ChannelMeter

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


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_meters_feed_history_hub_and_alerts_latest_wins(engine: AsyncEngine) -> None:
    hub = LiveHub()
    alerts = AlertService(engine, hub=hub)
    history = HistoryService(engine)
    meters = MeterService(alerts=alerts, history=history, hub=hub)
    subscription = hub.subscribe(topics=frozenset({Topic.METER}))
    # Before the task runs, a second meter of the same device replaces the first one waiting.
    meters.submit(meter_event("dev-1", peak=-30.0, seq=1))
    meters.submit(meter_event("dev-1", peak=-0.5, seq=2))
    meters.submit(meter_event("dev-2", peak=-30.0, seq=3))
    assert (meters.stats.received, meters.stats.superseded) == (3, 1)
    assert subscription.pending() == 3 and history.pending == 2
    first = await subscription.get()
    assert first is not None and first.data["device_key"] == "dev-1"
    assert first.data["channels"][0]["audio_peak_dbfs"] == -30.0
    await meters.start()
    await meters.start()  # idempotent: still one task
    try:
        await wait_for(lambda: meters.stats.evaluated == 2)
        # Only the latest meter of dev-1 was evaluated: it clips, so the alert is open in the store.
        [alert] = await alerts.list_alerts(states=[AlertState.OPEN])
        assert alert.rule is AlertRule.AUDIO_CLIPPING and alert.device_key == "dev-1" and alert.value == -0.5
        assert meters.stats.failed == 0
    finally:
        await meters.close()
    assert meters._task is None
    # After close, meters still reach history and the hub but wait for no evaluation.
    meters.submit(meter_event("dev-3", peak=-30.0))
    await meters.close()  # nothing waiting afterwards
    assert meters._pending == {} and meters.stats.evaluated == 2
    assert await history.flush() == 3


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
            await wait_for(lambda: meters.stats.failed == 1)
            meters.submit(meter_event("dev-1", peak=-0.5, seq=1))
            await wait_for(lambda: meters.stats.failed == 2)
        assert meters.stats.evaluated == 0 and meters.stats.received == 2
        failures = [r for r in caplog.records if r.getMessage() == "meter alert evaluation failed"]
        assert len(failures) == 2 and all("no such table" in traceback_of(r) for r in failures)
        assert meters._task is not None and not meters._task.done()
    finally:
        await meters.close()
        await broken.dispose()


async def test_without_alerts_there_is_no_task_and_no_waiting_meter() -> None:
    hub = LiveHub()
    meters = MeterService(hub=hub)
    subscription = hub.subscribe()
    await meters.start()
    assert meters._task is None
    meters.submit(meter_event("dev-1", peak=-0.5))
    assert meters.stats.received == 1 and meters._pending == {}
    message = await subscription.get()
    assert message is not None and message.topic is Topic.METER and message.site == SITE
    await meters.close()
    bare = MeterService()
    bare.submit(meter_event("dev-1", peak=-10.0))
    assert bare.stats.received == 1 and bare.stats.superseded == 0
