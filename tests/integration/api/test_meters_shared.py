"""Meters with two ingesting collectors on one NATS and one database.

Every meter reaches both collectors' alert rules (the RF-loss timer of a channel needs all of its
readings), and exactly one collector's history (a bucket counts each reading once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import nats
from sqlalchemy import func, select
from tests.waiting import until

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.app import Collector
from micboard.collector.services.meters import decode_meter
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.schema_alerts import history_samples
from micboard.shared.codec import encode
from micboard.shared.envelope import DeviceBody, HelloBody, MeterBody
from micboard.shared.model import ChannelMeter, Device
from micboard.shared.natsd import EmbeddedNats

SITE, AGENT = "venue-s", "pi-s"


async def _samples(collectors: list[Collector]) -> int:
    """Samples in history once both collectors wrote what they hold."""
    for collector in collectors:
        assert collector.history is not None and collector.running is not None
        await collector.history.flush()
    engine = collectors[0].running.engine if collectors[0].running else None
    assert engine is not None
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.sum(history_samples.c.samples)))).scalar_one() or 0)


async def test_both_collectors_evaluate_every_meter_and_history_counts_each_once(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path, make_receiver: Callable[..., Device]
) -> None:
    collectors = [
        Collector(
            CollectorSettings(
                nats_url=nats_private.url,
                database_url=sqlite_url,
                http_port=0,
                state_dir=tmp_path / name,
                fetch_timeout_s=0.2,
            )
        )
        for name in ("a", "b")
    ]
    running = [await collector.start() for collector in collectors]
    nc = await nats.connect(nats_private.url)
    try:
        factory = EnvelopeFactory(SITE, AGENT)
        publisher = JetStreamPublisher(nc)
        await publisher.publish(factory.make(HelloBody(version="1.0")))
        await publisher.publish(factory.make(DeviceBody(device_key="rx1", snapshot=make_receiver("rx1"))))
        await until(lambda: sum(r.ingest.stats.events for r in running if r.ingest) >= 2, timeout_s=15.0)
        before = await _samples(collectors)  # the snapshot's battery readings
        decoded = decode_meter.cache_info()
        count = 60
        for n in range(count):
            # Unusable RF, then usable: every reading matters to the RF-loss timer.
            rf = -99.0 if n % 2 == 0 else -50.0
            level = -40.0 + n * 0.25  # every meter's bytes differ
            body = MeterBody(
                device_key="rx1", channels=(ChannelMeter(index=1, rf_dbm=(rf, rf), audio_dbfs=level),)
            )
            await nc.publish(f"micboard.v1.{SITE}.{AGENT}.meter", encode(factory.make(body)))
        await nc.flush()
        meters = [collector.meters for collector in collectors]
        assert all(m is not None for m in meters)
        await until(lambda: all(m is not None and m.stats.received == count for m in meters), timeout_s=15.0)
        await until(lambda: sum(m.stats.recorded for m in meters if m is not None) == count, timeout_s=15.0)
        for m in meters:
            assert m is not None and m.stats.bad == 0 and m.stats.failed == 0
        # Three deliveries of each meter in this test process (two live feeds, one history share),
        # one decode: the others found it decoded.
        after = decode_meter.cache_info()
        assert (after.misses - decoded.misses, after.hits - decoded.hits) == (count, 2 * count)
        # Each meter of one channel is one sample, whichever collector folded it in.
        assert await _samples(collectors) - before == count
        async with aiohttp.ClientSession() as http:
            texts = []
            for r in running:
                async with http.get(f"{r.url}/metrics") as response:
                    texts.append(await response.text())
        for text in texts:
            assert f'micboard_meters_total{{outcome="received"}} {count}.0' in text
    finally:
        await nc.close()
        for collector in collectors:
            await collector.stop()
