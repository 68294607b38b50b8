"""The collector's periodic jobs on a store that breaks under them: each logs, retries, and goes on."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats

FAILURES = (
    "stale check failed; retrying next interval",
    "prune failed; retrying next interval",
    "alert sweep failed; retrying next interval",
)


async def test_periodic_jobs_survive_a_broken_store(
    nats_private: EmbeddedNats,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    collector_settings: Callable[..., CollectorSettings],
) -> None:
    db = tmp_path / "collector.db"
    settings = collector_settings(
        nats_private.url,
        stale_check_interval_s=0.05,
        dedup_prune_interval_s=0.05,
        alert_sweep_interval_s=0.05,
    )
    collector = Collector(settings)
    running = await collector.start()
    try:
        with caplog.at_level(logging.WARNING, logger="micboard.collector.app"):
            # The tables the jobs read disappear (a restore gone wrong, an operator's mistake).
            conn = sqlite3.connect(db, timeout=10)
            try:
                for table in ("agents", "applied_events", "alerts", "history_samples"):
                    conn.execute(f"DROP TABLE {table}")
                conn.commit()
            finally:
                conn.close()
            deadline = time.monotonic() + 15
            while True:
                seen = {r.getMessage() for r in caplog.records}
                if all(f in seen for f in FAILURES):
                    break
                assert time.monotonic() < deadline, f"not every job reported its failure: {seen}"
                await asyncio.sleep(0.05)
            # Each job tries again at its next interval rather than dying.
            count = sum(r.getMessage() in FAILURES for r in caplog.records)
            await asyncio.sleep(0.3)
            assert sum(r.getMessage() in FAILURES for r in caplog.records) > count
        # The process is still up: the database answers (it lost tables, not its file) and NATS too.
        async with aiohttp.ClientSession() as http, http.get(running.url + "/healthz") as response:
            assert response.status == 200
            assert (await response.json())["database"] == "ok"
        # A sample waiting in memory cannot be written at stop: said, and the stop completes.
        assert collector.history is not None
        collector.history.record_battery("venue", "pi-1", "rx-1", [(1, 50, 3)])
    finally:
        with caplog.at_level(logging.WARNING, logger="micboard.collector.app"):
            await collector.stop()
    assert collector.running is None
    assert "history flush at stop failed" in {r.getMessage() for r in caplog.records}


async def test_stop_after_the_nats_server_went_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, collector_settings: Callable[..., CollectorSettings]
) -> None:
    # Ctrl-C in a terminal reaches nats-server and the collector together; the server may be
    # gone before the collector closes its connection. Stopping must still finish cleanly.
    nats = EmbeddedNats(store_dir=tmp_path / "nats").start()
    collector = Collector(collector_settings(nats.url))
    await collector.start()
    nc = collector._nc
    assert nc is not None
    real_close = nc.close

    async def close_mid_shutdown() -> None:
        # What the demo showed when nats-server stopped while the client drained: the
        # close itself fails with the connection lost.
        await real_close()
        raise ConnectionResetError("Connection lost")

    nc.close = close_mid_shutdown  # type: ignore[method-assign]
    nats.stop()
    with caplog.at_level(logging.WARNING, logger="micboard.collector.app"):
        await asyncio.wait_for(collector.stop(), timeout=30)
    assert collector._nc is None and collector._engine is None
    assert "NATS connection lost while closing" in {r.getMessage() for r in caplog.records}
