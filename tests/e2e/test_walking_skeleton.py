"""One event end to end: agent -> real nats-server -> collector -> SQLite -> HTTP API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import nats
import pytest

from micboard.agent.demo_source import demo_device
from micboard.agent.outbox import OUTBOX_FILE
from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.agent.runner import AgentRunner
from micboard.agent.settings import AgentSettings
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.shared.codec import encode
from micboard.shared.envelope import HelloBody
from micboard.shared.natsd import EmbeddedNats

TOKEN = "mbt_walking-skeleton-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def wait_for_devices(url: str, count: int, timeout_s: float = 10.0) -> list[dict[str, object]]:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            async with http.get(f"{url}/api/v1/devices") as response:
                assert response.status == 200
                body = await response.json()
            if body["total"] >= count or asyncio.get_running_loop().time() > deadline:
                return list(body["items"])
            await asyncio.sleep(0.1)


async def test_device_snapshot_travels_to_the_api(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path
) -> None:
    settings = CollectorSettings(
        nats_url=nats_private.url,
        database_url=sqlite_url,
        http_port=0,
        durable_name="collector",
        state_dir=tmp_path,
        fetch_timeout_s=0.2,
        bootstrap_token=TOKEN,
    )
    collector = Collector(settings)
    running = await collector.start()
    try:
        agent = AgentRunner(
            AgentSettings(
                site="venue-a",
                agent="pi-a",
                nats_url=nats_private.url,
                heartbeat_interval_s=0.2,
                # The test's own directory, not ./state of wherever the tests run.
                state_dir=tmp_path / "agent",
            ),
            [demo_device()],
        )
        task = asyncio.create_task(agent.run())
        items = await wait_for_devices(running.url, 1)
        agent.stop()
        await asyncio.wait_for(task, 5)
        assert len(items) == 1
        item = items[0]
        assert (item["site"], item["agent"], item["device_key"], item["status"]) == (
            "venue-a",
            "pi-a",
            "demo-ulxd4q",
            "online",
        )
        detail_url = f"{running.url}/api/v1/devices/{item['id']}"
        async with aiohttp.ClientSession(headers=AUTH) as http, http.get(detail_url) as response:
            device = (await response.json())["device"]
        assert isinstance(device, dict)
        assert device["model"] == "ULXD4Q"
        assert device["channels"][0]["name"] == "HH01 Fatai"
        assert device["channels"][0]["transmitter"]["battery_bars"] == 4
        assert agent.published >= 3  # hello, snapshot, at least one heartbeat
        assert (tmp_path / "agent" / OUTBOX_FILE).is_file()
        assert running.ingest is not None
        assert running.ingest.stats.poison == 0
        async with aiohttp.ClientSession() as http, http.get(f"{running.url}/healthz") as response:
            health = await response.json()
        assert response.status == 200 and health["database"] == "ok"
    finally:
        await collector.stop()


async def test_msg_id_deduplicates_a_republished_event(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path
) -> None:
    settings = CollectorSettings(
        nats_url=nats_private.url, database_url=sqlite_url, http_port=0, state_dir=tmp_path
    )
    collector = Collector(settings)
    await collector.start()
    try:
        nc = await nats.connect(nats_private.url)
        publisher = JetStreamPublisher(nc)
        event = EnvelopeFactory("venue-a", "pi-b").make(HelloBody(version="x"))
        first = await publisher.publish(event)
        again = await publisher.publish(event)
        await nc.close()
        assert first is not None and again is not None
        assert again.duplicate is True and again.seq == first.seq
    finally:
        await collector.stop()


async def test_poison_is_terminated_and_kept(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path
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
    try:
        nc = await nats.connect(nats_private.url)
        js = nc.jetstream()
        await js.publish("micboard.v1.venue-a.pi-c.hello", b"\xc1garbage")
        spoofed = EnvelopeFactory("venue-b", "pi-x").make(HelloBody(version="x"))
        await js.publish("micboard.v1.venue-a.pi-c.hello", encode(spoofed))
        await nc.close()
        assert running.ingest is not None
        for _ in range(100):
            if running.ingest.stats.poison >= 2:
                break
            await asyncio.sleep(0.05)
        assert running.ingest.stats.poison_by_code == {"wire.garbage": 1, "wire.invalid": 1}
    finally:
        await collector.stop()


def test_collector_cli_reports_version(capsys: pytest.CaptureFixture[str]) -> None:
    from micboard.agent.cli import main as agent_main
    from micboard.collector.cli import main as collector_main

    for main, name in ((agent_main, "micboard-agent"), (collector_main, "micboard-collector")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == f"{name} 26.11.28"
