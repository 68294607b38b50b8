"""A collector process killed with SIGKILL in the middle of ingest loses nothing and applies nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from sqlalchemy import func, select

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.ingest import ensure_stream
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.schema import applied_events, devices
from micboard.shared.envelope import AnyEvent, DeviceBody, HelloBody
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor, apply_changes
from micboard.shared.natsd import EmbeddedNats

pytestmark = pytest.mark.slow

EVENTS = 2000
RECEIVERS = 20


def _fleet() -> tuple[list[AnyEvent], dict[str, Device]]:
    factory = EnvelopeFactory("venue", "pi-1")
    events: list[AnyEvent] = [factory.make(HelloBody(version="1"))]
    expected: dict[str, Device] = {}
    for r in range(RECEIVERS):
        device = Device(
            device_key=f"rx-{r}",
            vendor=Vendor.SHURE,
            family=Family.ULXD,
            channels=tuple(
                ReceiverChannel(index=c, transmitter=Transmitter(battery_percent=100)) for c in (1, 2)
            ),
        )
        events.append(factory.make(DeviceBody(device_key=device.device_key, snapshot=device)))
        expected[device.device_key] = device
    step = 0
    while len(events) < EVENTS:
        key, channel = f"rx-{step % RECEIVERS}", 1 + step % 2
        changes: dict[str, Any] = {
            "channels": {channel: {"transmitter": {"battery_percent": 99 - step % 100}}}
        }
        if step % 7 == 0:
            changes = {"name": f"rack {step}"}
        events.append(factory.make(DeviceBody(device_key=key, changes=changes)))
        expected[key] = apply_changes(expected[key], changes)
        step += 1
    return events, expected


async def _start_collector(env: dict[str, str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("micboard-collector")), "run",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
    assert b"listening" in line, line
    return process


async def test_sigkill_mid_ingest_then_restart_applies_every_event_once(
    nats_private: EmbeddedNats, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'micboard.db'}"
    env = {
        **os.environ,
        "MICBOARD_NATS_URL": nats_private.url,
        "MICBOARD_DATABASE_URL": db_url,
        "MICBOARD_STATE_DIR": str(tmp_path / "state"),
        "MICBOARD_HTTP_PORT": "0",
        "MICBOARD_BATCH_SIZE": "50",
        "MICBOARD_FETCH_TIMEOUT_S": "0.2",
        "MICBOARD_ACK_WAIT_S": "1",
        "MICBOARD_REDELIVERY_BACKOFF_S": "[1]",
        "MICBOARD_LOG_LEVEL": "WARNING",
    }
    settings = CollectorSettings(
        nats_url=nats_private.url, ack_wait_s=1, redelivery_backoff_s=[1], batch_size=50
    )
    events, expected = _fleet()
    nc = await nats.connect(nats_private.url)
    await ensure_stream(nc.jetstream(), settings)
    publisher = JetStreamPublisher(nc)
    for item in events:
        await publisher.publish(item)

    engine = create_engine(db_url)

    async def applied() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(applied_events))).scalar_one())

    first = await _start_collector(env)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (count := await applied()) == 0:
            assert loop.time() < deadline
            await asyncio.sleep(0.005)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    assert first.returncode == -signal.SIGKILL
    assert 0 < count < EVENTS, f"the kill must land mid-ingest ({count} applied)"

    second = await _start_collector(env)
    try:
        deadline = loop.time() + 30
        while await applied() < EVENTS:
            assert loop.time() < deadline, await applied()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # past the ack wait: anything redelivered late must stay a no-op
        info = await nc.jetstream().consumer_info(settings.stream_name, settings.durable_name)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), timeout=15)
    assert second.returncode == 0
    await nc.close()

    assert await applied() == EVENTS
    async with engine.connect() as conn:
        rows = (await conn.execute(select(devices.c.device_key, devices.c.state))).all()
    await engine.dispose()
    assert {key: Device.model_validate(state) for key, state in rows} == expected
