"""The agent daemon against a simulator rack, a real nats-server with the stream, and a consumer.

The rack announces itself on DNS-SD under service types unique to the test, so that the agent
adopts this rack and nothing another test run on the same host announces on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from tests.daemon_rig import no_leftover_tasks_or_threads, server_with_stream

from micboard.agent.daemon import AgentDaemon
from micboard.agent.drivers.sennheiser import SscSimulator
from micboard.agent.drivers.shure import ShureSimulator
from micboard.agent.settings import AgentSettings
from micboard.agent.simulate import SimulatorRack
from micboard.shared.codec import decode, decode_command_result, encode
from micboard.shared.envelope import (
    AnyEvent,
    CommandAction,
    CommandBody,
    CommandEvent,
    CommandOutcome,
    CommandResult,
    DeviceEvent,
    DiscoveredEvent,
    HeartbeatEvent,
    MeterEvent,
    OfflineEvent,
)
from micboard.shared.natsd import EmbeddedNats, free_port

BIN = Path(sys.executable).parent
SILENCE_S = 2.0


@pytest.fixture(scope="module")
def nats_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A nats-server of this module with the collector's stream."""
    with server_with_stream(tmp_path_factory.mktemp("nats-agent")) as server:
        yield server


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves a task or a thread behind (a source opened to probe an interface, say)."""
    async with no_leftover_tasks_or_threads():
        yield


class StreamConsumer:
    """Reads every JetStream event of one site from the stream, and its meters from core NATS."""

    def __init__(self, nc: Client, site: str) -> None:
        self.nc = nc
        self.site = site
        self.events: list[AnyEvent] = []
        self.meters: list[tuple[float, MeterEvent]] = []
        self._stream: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        js = self.nc.jetstream()
        self._stream = await js.subscribe(
            f"micboard.v1.{self.site}.*.*", cb=self._on_event, ordered_consumer=True
        )
        await self.nc.subscribe(f"micboard.v1.{self.site}.*.meter", cb=self._on_meter)

    async def close(self) -> None:
        # Unsubscribing ends the ordered consumer's heartbeat task, which closing the client does not.
        if self._stream is not None:
            await self._stream.unsubscribe()
        await self.nc.close()

    async def _on_event(self, msg: Msg) -> None:
        self.events.append(decode(msg.data))

    async def _on_meter(self, msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, MeterEvent)
        self.meters.append((time.monotonic(), event))

    def device_events(self, key: str) -> list[DeviceEvent]:
        return [e for e in self.events if isinstance(e, DeviceEvent) and e.body.device_key == key]

    async def wait(self, predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        async with asyncio.timeout(timeout_s):
            while not (result := predicate()):  # noqa: ASYNC110 - the lists are filled by callbacks
                await asyncio.sleep(0.02)
        return result


def agent_settings(nats_url: str, state_dir: Path, site: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "site": site,
        "agent": "rack-agent",
        "nats_url": nats_url,
        "state_dir": state_dir,
        "discovery_slp": False,
        "heartbeat_interval_s": 1.0,
        "silence_timeout_s": SILENCE_S,
        "connect_timeout_s": 1.0,
        "driver_command_timeout_s": 1.0,
        "poll_interval_s": 1.0,
        "reconnect_backoff_initial_s": 0.2,
        "reconnect_backoff_max_s": 1.0,
        "command_timeout_s": 3.0,
        "shutdown_timeout_s": 4.0,
        **overrides,
    }
    return AgentSettings(**values)


def command(site: str, agent: str, action: CommandAction, **body: Any) -> bytes:
    event = CommandEvent(
        site=site,
        agent=agent,
        boot="collector",
        seq=0,
        ts=int(time.time() * 1000),
        body=CommandBody(request_id=secrets.token_hex(4), action=action, **body),
    )
    return encode(event)


async def ask(nc: Client, subject: str, data: bytes) -> CommandResult:
    reply = await nc.request(subject, data, timeout=5)
    return decode_command_result(reply.data)


async def test_agent_adopts_the_rack_over_mdns_and_publishes_state_meters_and_commands(
    nats_agent: EmbeddedNats, tmp_path: Path
) -> None:
    tag = secrets.token_hex(3)
    site = f"site-{tag}"
    tcp, udp = f"_mb{tag}._tcp.local.", f"_mb{tag}._udp.local."
    rack = SimulatorRack(
        ["ulxd4d", "slxd4", "ewdx-em2"],
        seed=int(tag, 16),
        activity=0.0,
        slp=False,
        fixed_ports=False,
        service_types={"_shure._tcp.local.": tcp, "_ssc._udp.local.": udp},
    )
    await rack.start()
    ulxd, slxd, ewdx = rack.simulators
    assert isinstance(ulxd, ShureSimulator) and isinstance(slxd, ShureSimulator)
    assert isinstance(ewdx, SscSimulator)
    metrics_port = free_port()
    settings = agent_settings(
        nats_agent.url, tmp_path / "state", site, mdns_service_types=[tcp, udp], metrics_port=metrics_port
    )
    daemon = AgentDaemon(settings)
    nc = await nats.connect(nats_agent.url)
    consumer = StreamConsumer(nc, site)
    try:
        await consumer.start()
        await daemon.start()

        # Discovery over mDNS adopts all three; each sends a full snapshot first.
        await consumer.wait(lambda: len(daemon.supervisor) == 3)
        keys = daemon.supervisor.keys()
        await consumer.wait(lambda: all(consumer.device_events(k) for k in keys))
        for key in keys:
            assert consumer.device_events(key)[0].body.is_snapshot
        by_port = {daemon.supervisor.get(k).target.port: k for k in keys}  # type: ignore[union-attr]
        ulxd_key, slxd_key, ewdx_key = by_port[ulxd.port], by_port[slxd.port], by_port[ewdx.port]
        discovered = [e for e in consumer.events if isinstance(e, DiscoveredEvent)]
        assert {e.body.port for e in discovered} >= {ulxd.port, slxd.port, ewdx.port}
        assert consumer.events[0].kind == "hello"
        await daemon.wait_subscribed()

        # A battery change produces a delta with only that transmitter in it.
        seen = len(consumer.device_events(ulxd_key))
        ulxd.set_battery(2, bars=1)

        def battery_delta() -> DeviceEvent | None:
            for event in consumer.device_events(ulxd_key)[seen:]:
                changes = event.body.changes or {}
                if changes.get("channels", {}).get(2, {}).get("transmitter") is not None:
                    return event
            return None

        delta = await consumer.wait(battery_delta)
        assert list(delta.body.changes) == ["channels"]
        assert list(delta.body.changes["channels"]) == [2]
        assert list(delta.body.changes["channels"][2]) == ["transmitter"]
        assert delta.body.changes["channels"][2]["transmitter"]["battery_bars"] == 1

        # Prometheus text on loopback.
        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        scraped = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
        await writer.wait_closed()
        assert 'micboard_agent_devices{state="online"} 3' in scraped
        assert 'micboard_agent_events_total{kind="device"}' in scraped
        assert 'micboard_agent_dropped_total{reason="full"} 0' in scraped
        assert (
            "micboard_agent_outbox_depth" in scraped and "micboard_agent_driver_parse_errors_total" in scraped
        )

        # Meters arrive on core NATS, at most 4 per second per channel.
        consumer.meters.clear()
        await asyncio.sleep(2.0)
        window = consumer.meters
        assert {e.body.device_key for _, e in window} >= {ulxd_key, ewdx_key}
        per_channel: dict[tuple[str, int], int] = {}
        for _, event in window:
            for channel in event.body.channels:
                per_channel[event.body.device_key, channel.index] = (
                    per_channel.get((event.body.device_key, channel.index), 0) + 1
                )
        assert per_channel and max(per_channel.values()) <= 4 * 2 + 2
        assert not [e for e in consumer.events if e.kind == "meter"]  # never persisted

        # Commands by request/reply.
        subject = daemon.cmd_subject
        renamed = await ask(nc, subject, command(site, "rack-agent", CommandAction.RENAME,
                                                 device_key=ulxd_key, channel=1, value="Vox 9"))  # fmt: skip
        assert renamed.outcome is CommandOutcome.OK, renamed.detail
        assert ulxd.channel(1).name.strip() == "Vox 9"
        muted = await ask(
            nc, subject, command(site, "rack-agent", CommandAction.MUTE, device_key=slxd_key, channel=1)
        )
        assert muted.outcome is CommandOutcome.NOT_SUPPORTED
        ssc_mute = await ask(
            nc, subject, command(site, "rack-agent", CommandAction.MUTE, device_key=ewdx_key, channel=1)
        )
        assert ssc_mute.outcome is CommandOutcome.OK, ssc_mute.detail
        unknown = await ask(
            nc, subject, command(site, "rack-agent", CommandAction.IDENTIFY, device_key="nope")
        )
        assert unknown.outcome is CommandOutcome.DEVICE_OFFLINE
        no_key = await ask(nc, subject, command(site, "rack-agent", CommandAction.IDENTIFY))
        assert no_key.outcome is CommandOutcome.INVALID
        wrong = command("other-site", "rack-agent", CommandAction.IDENTIFY, device_key=ulxd_key)
        refused = await ask(nc, subject, wrong)
        assert refused.outcome is CommandOutcome.INVALID and daemon.stats.commands_refused == 1
        garbage = await ask(nc, subject, b"\x93not a command")
        assert garbage.outcome is CommandOutcome.INVALID and garbage.request_id == "unknown"
        again = await ask(nc, subject, command(site, "rack-agent", CommandAction.REDISCOVER))
        assert again.outcome is CommandOutcome.OK

        # A receiver that goes silent is offline within its timeout + 1 s, then a snapshot follows.
        seen = len(consumer.events)
        went_silent = time.monotonic()
        slxd.faults.silent = True
        offline = await consumer.wait(
            lambda: next(
                (
                    e
                    for e in consumer.events[seen:]
                    if isinstance(e, OfflineEvent) and e.body.device_key == slxd_key
                ),
                None,
            ),
            timeout_s=SILENCE_S + 3,
        )
        assert time.monotonic() - went_silent <= SILENCE_S + 1.0 + 0.5  # +0.5: stream round trip
        assert offline.body.reason.value == "silent"
        slxd.faults.silent = False
        back = await consumer.wait(
            lambda: [
                e for e in consumer.device_events(slxd_key) if e.seq > offline.seq and e.body.is_snapshot
            ]
        )
        assert back[0].body.snapshot.device_key == slxd_key

        # The heartbeat counts devices by state.
        beats = [e for e in consumer.events if isinstance(e, HeartbeatEvent)]
        assert beats and beats[-1].body.devices_by_state["online"] >= 2
        # Lanes publish concurrently: the order holds per device (and for the agent's own events).
        lanes: dict[str, list[int]] = {}
        for stored in consumer.events:
            lane = stored.body.device_key if isinstance(stored, DeviceEvent | OfflineEvent) else ""
            lanes.setdefault(lane, []).append(stored.seq)
        assert all(seqs == sorted(seqs) for seqs in lanes.values())
        all_seqs = [e.seq for e in consumer.events]
        assert len(set(all_seqs)) == len(all_seqs)
    finally:
        await daemon.close()
        await consumer.close()
        await rack.stop()


async def test_sigterm_stops_the_agent_within_five_seconds(nats_agent: EmbeddedNats, tmp_path: Path) -> None:
    site = f"term-{secrets.token_hex(3)}"
    rack = SimulatorRack(["ulxd4", "ewdx-em2"], seed=7, activity=0.0, announce=False, fixed_ports=False)
    await rack.start()
    config = tmp_path / "agent.toml"
    lines = [f'site = "{site}"', 'agent = "term-agent"', "discovery_mdns = false", "discovery_slp = false"]
    for entry in rack.static_devices():
        lines += ["", "[[static_devices]]"] + [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
                                              for k, v in entry.items()]  # fmt: skip
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "MICBOARD_NATS_URL": nats_agent.url, "MICBOARD_STATE_DIR": str(tmp_path / "state")}
    nc = await nats.connect(nats_agent.url)
    consumer = StreamConsumer(nc, site)
    await consumer.start()
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log_file:
        # A file, not a pipe: a pipe nobody reads while the agent runs could fill and block it.
        process = await asyncio.create_subprocess_exec(
            BIN / "micboard-agent", "run", "--config", str(config),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        await consumer.wait(
            lambda: len({e.body.device_key for e in consumer.events if isinstance(e, DeviceEvent)}) == 2,
            timeout_s=20,
        )
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5.0):
            code = await process.wait()
        assert time.monotonic() - started < 5.0
        log = log_path.read_text()
        assert code == 0, log[-2000:]
        assert "agent stopped" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await consumer.close()
        await rack.stop()


async def run_cli(
    *args: str, timeout_s: float = 20.0, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        BIN / "micboard-agent", *args, env=env or dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_simulate_discover_and_check_on_the_command_line(
    nats_agent: EmbeddedNats, tmp_path: Path
) -> None:
    seed = secrets.randbelow(10_000)
    simulate = await asyncio.create_subprocess_exec(
        BIN / "micboard-agent", "simulate", "--device", "ulxd4q", "--device", "ewdx-em2",
        "--listen", "127.0.0.1", "--seed", str(seed), "--any-port", "--no-slp",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert simulate.stdout is not None
    try:
        lines: list[str] = []
        async with asyncio.timeout(15):
            while not lines or "Ctrl-C" not in lines[-1]:
                lines.append((await simulate.stdout.readline()).decode())
        listing = "".join(lines)
        assert "simulating 2 receiver(s) on 127.0.0.1" in listing
        rows = [line.split() for line in lines if "listening on" in line]
        assert [row[0] for row in rows] == ["ulxd4q", "ewdx-em2"]
        endpoints = {row[0]: row[row.index("on") + 2] for row in rows}
        shure_id = rows[0][2].removeprefix("id=")

        code, out, err = await run_cli("discover", "--seconds", "3", "--interface", "127.0.0.1", "--no-slp")
        assert code == 0, err
        assert "scanning 127.0.0.1" in err and "100%" in err
        assert f"{endpoints['ulxd4q']}" in out and shure_id in out
        assert endpoints["ewdx-em2"] in out and "EW-DX EM 2" in out

        config = tmp_path / "agent.toml"
        shure_port = endpoints["ulxd4q"].rsplit(":", 1)[1]
        ssc_port = endpoints["ewdx-em2"].rsplit(":", 1)[1]
        config.write_text(
            'site = "cli"\nagent = "cli-agent"\n'
            f'[[static_devices]]\naddress = "127.0.0.1"\nport = {shure_port}\nfamily = "ulxd"\n'
            f'[[static_devices]]\naddress = "127.0.0.1"\nport = {ssc_port}\nfamily = "ewdx"\n'
        )
        env = {**os.environ, "MICBOARD_NATS_URL": nats_agent.url}
        code, out, err = await run_cli("check", "--config", str(config), env=env)
        assert code == 0, out + err
        assert "ok   nats:" in out and out.count("ok   device") == 2 and "all checks passed" in out
        assert "ULXD4Q" in out and "4 channel(s)" in out

        with config.open("a") as handle:
            handle.write(
                f'[[static_devices]]\naddress = "127.0.0.1"\nport = {free_port()}\nfamily = "slxd"\n'
            )
        env["MICBOARD_NATS_URL"] = "nats://127.0.0.1:1"
        code, out, _ = await run_cli("check", "--config", str(config), "--timeout", "2", env=env)
        assert code == 1
        assert "FAIL nats:" in out and "FAIL device slxd" in out and "2 check(s) failed" in out

        bad = tmp_path / "bad.toml"
        bad.write_text('site = "Not A Token"\n')
        code, out, _ = await run_cli("check", "--config", str(bad))
        assert code == 2 and "FAIL config" in out
    finally:
        if simulate.returncode is None:
            simulate.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                await simulate.communicate()
    assert simulate.returncode == 0
