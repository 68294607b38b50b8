"""The Collector's own jobs: systemd notifications (READY, WATCHDOG, STOPPING) and stale agents."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import nats
import pytest
from sqlalchemy import select

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.schema import agents, devices
from micboard.shared.envelope import DeviceBody, HeartbeatBody
from micboard.shared.errors import ConfigError
from micboard.shared.model import Device, Family, Vendor
from micboard.shared.natsd import EmbeddedNats


async def _receive(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=timeout_s)


async def test_notifies_systemd_and_marks_silent_agents_stale(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        manager.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
        settings = CollectorSettings(
            nats_url=nats_private.url, database_url=sqlite_url, http_port=0, state_dir=tmp_path,
            fetch_timeout_s=0.1, stale_check_interval_s=0.1,
        )  # fmt: skip
        collector = Collector(settings)
        await collector.start()
        try:
            assert (await _receive(manager)).startswith(b"READY=1")
            assert await _receive(manager) == b"WATCHDOG=1"
            nc = await nats.connect(nats_private.url)
            factory = EnvelopeFactory("venue", "pi-1")
            publisher = JetStreamPublisher(nc)
            await publisher.publish(factory.make(HeartbeatBody(uptime_s=1.0, interval_s=0.1)))
            device = Device(device_key="rx", vendor=Vendor.SHURE, family=Family.ULXD)
            await publisher.publish(factory.make(DeviceBody(device_key="rx", snapshot=device)))
            await nc.close()
            engine = create_engine(sqlite_url)
            seen: list[tuple[str, str]] = []
            for _ in range(100):
                async with engine.connect() as conn:
                    row = (
                        await conn.execute(
                            select(agents.c.status, devices.c.status).join_from(
                                agents, devices, agents.c.agent == devices.c.agent
                            )
                        )
                    ).first()
                if row is not None and (not seen or seen[-1] != tuple(row)):
                    seen.append((row[0], row[1]))
                if seen and seen[-1] == ("stale", "stale"):
                    break
                await asyncio.sleep(0.05)
            await engine.dispose()
            # Online first, then, three heartbeat intervals (0.3 s) after the agent fell silent, stale.
            assert seen[0] == ("online", "online") and seen[-1] == ("stale", "stale"), seen
        finally:
            await collector.stop()
        messages = []
        while True:
            try:
                messages.append(manager.recv(4096))
            except BlockingIOError:
                break
        assert b"STOPPING=1" in messages


async def test_bad_nats_options_fail_the_start_before_anything_runs(tmp_path: Path) -> None:
    settings = CollectorSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'micboard.db'}",
        http_port=0,
        state_dir=tmp_path,
        nats_nkey_seed_file=tmp_path / "missing.nk",
    )
    collector = Collector(settings)
    with pytest.raises(ConfigError, match=r"missing\.nk"):
        await collector.start()
    # No embedded nats-server was started (nor left running), no database file was opened.
    assert collector.embedded is None and collector.running is None
    assert not (tmp_path / "nats").exists() and not (tmp_path / "micboard.db").exists()
    await collector.stop()  # idempotent after a failed start


async def test_a_failure_late_in_the_start_stops_what_was_started(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = CollectorSettings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'micboard.db'}",
            http_port=taken.getsockname()[1],
            state_dir=tmp_path,
            fetch_timeout_s=0.1,
        )
        collector = Collector(settings)
        with pytest.raises(OSError):
            await collector.start()
    # The embedded nats-server, ingest, the services and the engine were all stopped again.
    assert collector.embedded is None and collector.running is None
    assert collector.history is None and collector.webhooks is None and collector.meters is None
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
