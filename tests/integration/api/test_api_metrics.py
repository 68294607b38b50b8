"""/healthz and /metrics: no token, the database and NATS, ingest counters and lag, fleet state, latency."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import nats

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.shared.codec import encode
from micboard.shared.envelope import DeviceBody, HelloBody, MeterBody
from micboard.shared.model import ChannelMeter, Device
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from tests.integration.api.conftest import LiveApi


async def test_healthz(api: LiveApi) -> None:
    status, body = await api.get("/healthz", role=None)
    assert status == 200
    assert body == {"status": "ok", "version": body["version"], "database": "ok", "nats": "ok"}
    await api.nc.close()
    status, body = await api.get("/healthz", role=None)
    assert status == 503 and body["status"] == "unhealthy" and body["nats"] == "error"


async def test_metrics_without_a_token(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1"), api.receiver("rx2")])
    await api.seed.offline("venue-a", "pi-a", "rx2")
    await api.get("/api/v1/devices")
    await api.get("/api/v1/devices/1")
    await api.get("/api/v1/devices/abc")
    status, text, response = await api.call("GET", "/metrics", role=None)
    assert status == 200 and response.content_type == "text/plain"
    assert 'micboard_api_request_seconds_bucket{le="0.05",method="GET",route="/api/v1/devices"}' in text
    assert 'micboard_api_request_seconds_count{method="GET",route="/api/v1/devices/{id}"} 1.0' in text
    assert 'micboard_api_requests_total{method="GET",route="/api/v1/devices",status="200"} 1.0' in text
    assert (
        'micboard_devices{status="online"} 1.0' in text and 'micboard_devices{status="offline"} 1.0' in text
    )
    assert 'micboard_alerts_open{severity="critical"} 0.0' in text
    assert "micboard_live_clients 0.0" in text
    assert "micboard_live_frames_total 0.0" in text


async def test_ingest_metrics(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path, make_receiver: Callable[..., Device]
) -> None:
    settings = CollectorSettings(
        nats_url=nats_private.url,
        database_url=sqlite_url,
        http_port=0,
        state_dir=tmp_path,
        fetch_timeout_s=0.2,
    )
    collector = Collector(settings)
    running = await collector.start()
    nc = await nats.connect(nats_private.url)
    try:
        publisher = JetStreamPublisher(nc)
        factory = EnvelopeFactory("venue-i", "pi-i")
        await publisher.publish(factory.make(HelloBody(version="1.0")))
        await publisher.publish(factory.make(DeviceBody(device_key="rx1", snapshot=make_receiver("rx1"))))
        await nc.jetstream().publish("micboard.v1.venue-i.pi-i.hello", b"\xc1")
        # Meters on core NATS: every one reaches the alert rules; history takes this process's share
        # of the queue group (all of them here).
        meter = MeterBody(device_key="rx1", channels=(ChannelMeter(index=1, audio_dbfs=-20.0),))
        await nc.publish("micboard.v1.venue-i.pi-i.meter", encode(factory.make(meter)))
        await nc.publish("micboard.v1.venue-i.pi-i.meter", b"\xc1")
        await nc.flush()
        assert running.ingest is not None and collector.meters is not None
        for _ in range(100):
            meters = collector.meters.stats
            if running.ingest.stats.events >= 3 and (meters.bad, meters.received) == (1, 1):
                break
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http, http.get(f"{running.url}/metrics") as response:
            text = await response.text()
        assert "micboard_ingest_events_total 3.0" in text
        busy = re.search(r"^micboard_ingest_batch_seconds_total (\S+)$", text, re.MULTILINE)
        assert busy is not None and 0 < float(busy.group(1)) < 60
        assert 'micboard_ingest_outcomes_total{outcome="applied"} 2.0' in text
        assert 'micboard_ingest_poison_total{code="wire.garbage"} 1.0' in text
        assert "micboard_ingest_lag_events 0.0" in text
        assert "micboard_ingest_fetch_errors_total 0.0" in text
        assert 'micboard_devices{status="online"} 1.0' in text
        assert 'micboard_meters_total{outcome="received"} 1.0' in text
        assert 'micboard_meters_total{outcome="recorded"} 1.0' in text
        assert 'micboard_meters_total{outcome="bad"} 1.0' in text
    finally:
        await nc.close()
        await collector.stop()
