"""/healthz and /metrics: no token, the database and NATS, ingest counters and lag, fleet state, latency."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import nats
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.api.app import create_app
from micboard.collector.app import Collector
from micboard.collector.ingest import IngestConsumer
from micboard.collector.services.alerts import AlertChange, AlertService, DeviceTransition
from micboard.collector.services.devices import DeviceService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.codec import encode
from micboard.shared.envelope import DeviceBody, HelloBody, MeterBody
from micboard.shared.model import ChannelMeter, Device
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from tests.live_api import LiveApi


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
    assert "micboard_live_connections 0.0" in text and "micboard_live_revoked_total 0.0" in text
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


async def test_a_live_websocket_is_counted_but_not_timed(api: LiveApi) -> None:
    await api.get("/api/v1/sites")
    ws = await api.http.ws_connect(f"{api.url}/api/v1/live")
    await ws.send_json({"type": "auth", "token": api.tokens["viewer"]})
    await ws.send_json({"type": "subscribe", "scope": "fleet", "meters": False})
    await ws.receive_json(timeout=5)  # the snapshot: the socket was served
    await ws.close()
    counted = 'micboard_api_requests_total{method="GET",route="/api/v1/live",status="101"} 1.0'
    # The request is recorded once the handler has seen the close.
    for _ in range(200):
        _, text, _ = await api.call("GET", "/metrics", role=None)
        if counted in text:
            break
        await asyncio.sleep(0.02)
    assert counted in text
    # Its duration is the connection's lifetime, not a latency: no histogram series for it.
    timed = [line for line in text.splitlines() if line.startswith("micboard_api_request_seconds")]
    assert 'micboard_api_request_seconds_count{method="GET",route="/api/v1/sites"} 1.0' in timed
    assert not [line for line in timed if 'route="/api/v1/live"' in line]


class _FailingAlerts(AlertService):
    """Alert rules that fail, as a bug in one would: the batch is applied without them."""

    async def evaluate_devices(
        self, conn: AsyncConnection, changes: Sequence[DeviceTransition], *, now_ms: int | None = None
    ) -> list[AlertChange]:
        raise RuntimeError("rule exploded")


async def _run_until(ingest: IngestConsumer, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not reached in time: {ingest.stats}"
        await ingest.run_once()


async def test_ingest_failures_are_exported(
    nats_private: EmbeddedNats, tmp_path: Path, make_receiver: Callable[..., Device]
) -> None:
    folder = tmp_path / "store"
    engine = create_engine(f"sqlite+aiosqlite:///{folder / 'micboard.db'}")
    await upgrade(engine)
    # Two deliveries at most, the second soon after the first: a dead letter within the test.
    settings = CollectorSettings(
        nats_url=nats_private.url,
        state_dir=tmp_path,
        fetch_timeout_s=0.2,
        ack_wait_s=2.0,
        redelivery_backoff_s=[],
        max_deliver=2,
        retry_delay_s=0.05,
        retry_max_delay_s=0.1,
    )
    nc = await nats.connect(nats_private.url)
    ingest = IngestConsumer(nc, engine, settings, alerts=_FailingAlerts(engine))
    runner = web.AppRunner(
        create_app(DeviceService(engine), settings=settings, nc=nc, ingest=ingest), access_log=None
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await ingest.start()
        publisher = JetStreamPublisher(nc)
        factory = EnvelopeFactory("venue-d", "pi-d")
        await publisher.publish(factory.make(HelloBody(version="1.0")))
        # A battery at one bar: the alert rules run for it, and fail.
        low = make_receiver("rx1", bars=(1,))
        await publisher.publish(factory.make(DeviceBody(device_key="rx1", snapshot=low)))
        # A delta of a device never seen waits for its snapshot until its last delivery.
        ghost = DeviceBody(device_key="ghost", changes={"channels": {1: {"name": "HH01 Nobody"}}})
        await publisher.publish(factory.make(ghost))
        await _run_until(ingest, lambda: ingest.stats.dead_lettered >= 1 and ingest.stats.alert_failures >= 1)
        # The database goes away (the pool kept the removed file open: dropped): ingest pauses.
        shutil.rmtree(folder)
        await engine.dispose()
        await publisher.publish(factory.make(DeviceBody(device_key="rx2", snapshot=make_receiver("rx2"))))
        await _run_until(ingest, lambda: ingest.stats.database_outages >= 1)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
        assert 'micboard_ingest_dead_lettered_total{code="ingest.deferred_expired"} 1.0' in text
        assert 'micboard_ingest_dead_lettered_total{code="ingest.apply_failed"} 0.0' in text
        assert "micboard_ingest_alert_failures_total 1.0" in text
        assert "micboard_ingest_database_outages_total 1.0" in text
    finally:
        await runner.cleanup()
        await nc.close()
        await engine.dispose()
