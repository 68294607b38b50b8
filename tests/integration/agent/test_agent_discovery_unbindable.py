"""Discovery that cannot bind on an interface stops nothing else: logged, reported, retried.

192.0.2.55 (TEST-NET-1) is no address of this host: binding or joining a group there fails
before anything is sent, so no traffic goes to it. The static devices are simulators on
127.0.0.1, the NATS server and the stream are real.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from tests.daemon_rig import no_leftover_tasks_or_threads, server_with_stream

from micboard.agent import cli
from micboard.agent.daemon import AgentDaemon
from micboard.agent.discovery import DiscoveryConfig, DiscoveryService, FoundDevice, SlpAnnouncer
from micboard.agent.discovery.slp import SLP_GROUP
from micboard.agent.metrics import render
from micboard.agent.settings import AgentSettings, StaticDeviceSetting
from micboard.agent.simulate import SimulatorRack
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent, DeviceEvent
from micboard.shared.natsd import EmbeddedNats, free_port

BIN = Path(sys.executable).parent
MISSING = "192.0.2.55"
AD4Q = "2ed3d3b4-0e36-4c04-a7ab-5e1b8b8b5a3f"
CANNOT_RUN = "discovery cannot run on this interface, trying again later"


@pytest.fixture(scope="module")
def nats_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A nats-server of this module with the collector's stream."""
    with server_with_stream(tmp_path_factory.mktemp("nats-unbindable")) as server:
        yield server


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves a task or a thread behind (a source opened to probe an interface, say)."""
    async with no_leftover_tasks_or_threads():
        yield


class Events:
    """Every JetStream event of one site, as the collector would read them."""

    def __init__(self, nc: Client, site: str) -> None:
        self.nc, self.site = nc, site
        self.events: list[AnyEvent] = []
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.jetstream().subscribe(
            f"micboard.v1.{self.site}.*.*", cb=self._on, ordered_consumer=True
        )

    async def _on(self, msg: Msg) -> None:
        self.events.append(decode(msg.data))

    def device_keys(self) -> set[str]:
        return {e.body.device_key for e in self.events if isinstance(e, DeviceEvent)}

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        await self.nc.close()


@pytest.fixture
async def rack() -> AsyncIterator[SimulatorRack]:
    """One receiver on 127.0.0.1, not announced: the agent knows it from its static list."""
    simulators = SimulatorRack(["ulxd4"], seed=11, activity=0.0, announce=False, fixed_ports=False)
    await simulators.start()
    yield simulators
    await simulators.stop()


def _settings(server: EmbeddedNats, tmp_path: Path, site: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "site": site,
        "agent": "pi-1",
        "nats_url": server.url,
        "state_dir": tmp_path / "state",
        "heartbeat_interval_s": 1.0,
        "poll_interval_s": 1.0,
        **overrides,
    }
    return AgentSettings(**values)


def _cannot_run(caplog: pytest.LogCaptureFixture) -> dict[tuple[str, str], str]:
    return {
        (getattr(r, "source", ""), getattr(r, "interface", "")): str(getattr(r, "error", ""))
        for r in caplog.records
        if r.getMessage() == CANNOT_RUN and r.levelno == logging.ERROR
    }


async def test_an_interface_the_host_lacks_leaves_static_devices_heartbeats_and_publishing_running(
    nats_stream: EmbeddedNats, tmp_path: Path, rack: SimulatorRack, caplog: pytest.LogCaptureFixture
) -> None:
    site = f"unbound-{secrets.token_hex(3)}"
    statics = [StaticDeviceSetting(**entry) for entry in rack.static_devices()]
    settings = _settings(nats_stream, tmp_path, site, interfaces=[MISSING], static_devices=statics)
    daemon = AgentDaemon(settings)
    events = Events(await nats.connect(nats_stream.url), site)
    await events.start()
    try:
        await daemon.start()  # before: StartError "discovery on 192.0.2.55: [Errno 19] No such device"

        # The error is logged once per source, with the reason, and nothing runs there.
        failing = _cannot_run(caplog)
        assert set(failing) == {("slp", MISSING), ("mdns", MISSING)}
        assert all(failing.values()), failing
        assert {(p.source, p.interface) for p in daemon.discovery.problems} == set(failing)
        assert daemon.discovery.sources_up() == {("slp", MISSING): False, ("mdns", MISSING): False}

        # The static device is adopted, polled and published; heartbeats go on.
        async with asyncio.timeout(15):
            while len(events.device_keys()) < 1 or not any(e.kind == "heartbeat" for e in events.events):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(daemon.supervisor) == 1

        # Reported where an operator looks: the status line and /metrics.
        status = daemon._status_line()  # the STATUS= line systemd shows
        assert status.endswith(f"; discovery failing: mdns on {MISSING}, slp on {MISSING}")
        scraped = render(daemon.collect_metrics())
        assert f'micboard_agent_discovery_up{{interface="{MISSING}",source="mdns"}} 0' in scraped
        assert f'micboard_agent_discovery_up{{interface="{MISSING}",source="slp"}} 0' in scraped
        assert daemon.failure is None
    finally:
        await daemon.close()
        await events.close()


async def test_discovery_goes_on_on_the_interfaces_that_work(
    nats_stream: EmbeddedNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # mDNS on 127.0.0.1 and on the missing address: it runs on loopback and finds the rack there.
    tag = secrets.token_hex(3)
    site = f"partial-{tag}"
    service_type = f"_mb{tag}._tcp.local."
    announced = SimulatorRack(
        ["ulxd4"], seed=12, activity=0.0, slp=False, fixed_ports=False,
        service_types={"_shure._tcp.local.": service_type},
    )  # fmt: skip
    await announced.start()
    settings = _settings(
        nats_stream, tmp_path, site,
        interfaces=["127.0.0.1", MISSING], discovery_slp=False, mdns_service_types=[service_type],
    )  # fmt: skip
    daemon = AgentDaemon(settings)
    try:
        await daemon.start()
        assert set(_cannot_run(caplog)) == {("mdns", MISSING)}
        assert daemon.discovery.sources_up() == {("mdns", "127.0.0.1"): True, ("mdns", MISSING): False}
        async with asyncio.timeout(15):
            while len(daemon.supervisor) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert [f.source for f in daemon.discovery.devices()] == ["mdns"]
        scraped = render(daemon.collect_metrics())
        assert 'micboard_agent_discovery_up{interface="127.0.0.1",source="mdns"} 1' in scraped
        assert f'micboard_agent_discovery_up{{interface="{MISSING}",source="mdns"}} 0' in scraped
    finally:
        await daemon.close()
        await announced.stop()


async def test_discovery_starts_when_what_refused_it_goes_away(caplog: pytest.LogCaptureFixture) -> None:
    # A socket holding the SLP group and port without sharing it: the listener cannot bind,
    # as when another program holds the port. Freed, the next retry opens SLP and finds the device.
    caplog.set_level(logging.INFO, logger="micboard.agent.discovery")
    port = free_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind((SLP_GROUP, port))
    found: list[FoundDevice] = []

    async def on_discovered(device: FoundDevice) -> None:
        found.append(device)

    service = DiscoveryService(
        DiscoveryConfig(interfaces=("127.0.0.1",), mdns=False, slp_port=port, retry_interval_s=0.3),
        on_discovered=on_discovered,
    )
    announcer = SlpAnnouncer(AD4Q, device_id="retry-me", port=port, interval_s=0.2)
    try:
        await service.start(keep_going=True)
        problems = service.problems
        assert [(p.source, p.interface) for p in problems] == [("slp", "127.0.0.1")]
        assert "in use" in problems[0].reason.lower()
        assert set(_cannot_run(caplog)) == {("slp", "127.0.0.1")}
        await asyncio.sleep(0.8)  # retried meanwhile: still refused, and logged only once
        assert sum(r.getMessage() == CANNOT_RUN for r in caplog.records) == 1
        assert service.slp is None and service.running

        blocker.close()
        await announcer.start()
        async with asyncio.timeout(10):
            while not found:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert found[0].source == "slp" and found[0].address == "127.0.0.1"
        assert service.problems == [] and service.sources_up() == {("slp", "127.0.0.1"): True}
        assert any(r.getMessage() == "discovery running again" for r in caplog.records)
        assert service.tasks() == [t for t in service.tasks() if t.get_name() == "discovery-worker"]
    finally:
        blocker.close()
        await announcer.close()
        await service.close()


def test_check_still_fails_on_the_interface(
    tmp_path: Path,
    nats_stream: EmbeddedNats,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "hall"\nagent = "pi-1"\nnats_url = "{nats_stream.url}"\ninterfaces = ["{MISSING}"]\n'
    )
    assert cli.main(["check", "--config", str(config), "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL interface {MISSING}: not usable for discovery: " in out and "1 check(s) failed" in out


async def test_run_stays_up_says_why_and_stops_cleanly(
    nats_stream: EmbeddedNats, tmp_path: Path, rack: SimulatorRack
) -> None:
    # What systemd saw before: exit 1 at once, restarted every 5 s, and no device published.
    site = f"run-{secrets.token_hex(3)}"
    entry = rack.static_devices()[0]
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "{site}"\nagent = "pi-1"\ninterfaces = ["{MISSING}"]\n\n[[static_devices]]\n'
        + "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n" for k, v in entry.items())
    )
    env = {**os.environ, "MICBOARD_NATS_URL": nats_stream.url, "MICBOARD_STATE_DIR": str(tmp_path / "state")}
    events = Events(await nats.connect(nats_stream.url), site)
    await events.start()
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            BIN / "micboard-agent", "run", "--config", str(config),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            while not events.device_keys():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert process.returncode is None
        log = log_path.read_text()
        assert "cannot start" not in log
        assert f'msg="{CANNOT_RUN}" source=slp interface={MISSING}' in log
        assert "level=error" in log.split(CANNOT_RUN)[0].rsplit("\n", 1)[-1]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            assert await process.wait() == 0
        assert time.monotonic() - started < 5
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await events.close()
