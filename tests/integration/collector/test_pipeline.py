"""The wired collector end to end: events through NATS and ingest to alerts, history and live views.

A real nats-server, a Collector on a free HTTP port (SQLite and PostgreSQL), events published
with the agent's own publishing code; everything is observed through the API and the WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client
from tests import live_messages

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.shared.envelope import DeviceBody, HeartbeatBody, HelloBody, MeterBody, OfflineBody
from micboard.shared.model import ChannelMeter, Device, Family, ReceiverChannel, Transmitter, Vendor
from micboard.shared.natsd import EmbeddedNats

pytestmark = pytest.mark.timeout(60)

TOKEN = "mbt_pipeline-test-token-0123456789abcdef"
SITE, AGENT, KEY = "venue-p", "pi-p", "rx1"
HOLD_S = 0.5


def receiver() -> Device:
    tx = Transmitter(model="ULXD2", battery_bars=5, battery_percent=100, runtime_min=600)
    return Device(
        device_key=KEY,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4D",
        channels=(
            ReceiverChannel(index=1, name="HH01 Fatai", transmitter=tx),
            ReceiverChannel(index=2, name="HH02 Ana", transmitter=tx),
        ),
    )


def battery(bars: int, percent: int) -> dict[str, Any]:
    """A delta setting channel 1's transmitter battery."""
    tx = {"model": "ULXD2", "battery_bars": bars, "battery_percent": percent, "runtime_min": percent * 6}
    return {"channels": {1: {"transmitter": tx}}}


@dataclass
class Rig:
    """A running collector, a publishing agent identity and an HTTP session with a token."""

    collector: Collector
    url: str
    nc: Client
    publisher: JetStreamPublisher
    factory: EnvelopeFactory
    http: aiohttp.ClientSession

    async def publish(self, body: Any) -> None:
        await self.publisher.publish(self.factory.make(body))

    async def get(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.http.get(f"{self.url}/api/v1{path}", headers=headers) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def alert(self, state: str, rule: str) -> dict[str, Any] | None:
        body = await self.get(f"/alerts?state={state}&site={SITE}")
        return next((a for a in body["items"] if a["rule"] == rule), None)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await probe()
        if found:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> dict[str, Any]:
    """The next live message on ``ws``; a ``batch`` frame's items are read one by one."""
    return await live_messages.next_message(ws, timeout_s)


async def next_alert(ws: aiohttp.ClientWebSocketResponse, rule: str, state: str) -> dict[str, Any]:
    """The next alert message on the WebSocket about ``rule`` in ``state`` (others are skipped)."""
    deadline = time.monotonic() + 10
    while True:
        data = await next_message(ws, deadline - time.monotonic())
        if data["type"] == "alert" and (data["item"]["rule"], data["item"]["state"]) == (rule, state):
            return dict(data["item"])


@contextlib.asynccontextmanager
async def running_rig(nats_url: str, db_url: str, tmp_path: Path, **settings: Any) -> AsyncIterator[Rig]:
    """A collector on ``db_url`` with ``settings`` on top of the fast ones every test here wants."""
    collector = Collector(
        CollectorSettings(
            nats_url=nats_url,
            database_url=db_url,
            auto_migrate="always",
            http_port=0,
            state_dir=tmp_path / "collector",
            fetch_timeout_s=0.1,
            bootstrap_token=TOKEN,
            **settings,
        )
    )
    running = await collector.start()
    nc = await nats.connect(nats_url)
    try:
        async with aiohttp.ClientSession() as http:
            yield Rig(collector, running.url, nc, JetStreamPublisher(nc), EnvelopeFactory(SITE, AGENT), http)
    finally:
        await nc.close()
        await collector.stop()


@pytest.fixture
async def rig(nats_private: EmbeddedNats, db_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_rig(
        nats_private.url,
        db_url,
        tmp_path,
        alert_resolve_hold_s=HOLD_S,
        alert_clip_resolve_hold_s=HOLD_S,
        alert_sweep_interval_s=0.1,
        history_bucket_s=1,
        history_flush_interval_s=0.1,
    ) as rig:
        yield rig


async def test_battery_offline_meters_reach_alerts_history_and_live(rig: Rig) -> None:
    await rig.publish(HelloBody(version="1.0"))
    await rig.publish(HeartbeatBody(uptime_s=1.0, interval_s=60.0))
    await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
    devices = await eventually(lambda: _devices(rig), "the device to be stored")
    device_id = devices[0]["id"]

    ws = await rig.http.ws_connect(f"{rig.url}/api/v1/live")
    await ws.send_json({"type": "auth", "token": TOKEN})
    await ws.send_json({"type": "subscribe", "scope": "site", "site": SITE})
    # Alerts are pushed to subscribed clients only: the snapshot says this one is.
    assert (await next_message(ws))["type"] == "snapshot"

    # A battery dropping to 2 bars opens battery_critical: in the store and on the WebSocket.
    await rig.publish(DeviceBody(device_key=KEY, changes=battery(2, 40)))
    pushed = await next_alert(ws, "battery_critical", "open")
    assert (pushed["channel"], pushed["severity"], pushed["device_key"]) == (1, "critical", KEY)
    listed = await eventually(lambda: rig.alert("open", "battery_critical"), "battery_critical listed")
    assert listed["id"] == pushed["id"]

    # Back past the hysteresis margin: resolved by the system once the hold time passed.
    recovered_at = time.monotonic()
    await rig.publish(DeviceBody(device_key=KEY, changes=battery(5, 100)))
    resolved = await next_alert(ws, "battery_critical", "resolved")
    assert time.monotonic() - recovered_at >= HOLD_S
    assert resolved["id"] == pushed["id"] and resolved["resolved_by"] == "system"
    assert await rig.alert("open", "battery_critical") is None

    # Meters on core NATS: RF and audio reach history, clipping opens audio_clipping.
    meter = MeterBody(
        device_key=KEY,
        channels=(
            ChannelMeter(index=1, rf_dbm=(-62.0, -70.0), audio_dbfs=-20.0, audio_peak_dbfs=-12.0),
            ChannelMeter(index=2, rf_dbm=(-55.0, None), audio_dbfs=-3.0, audio_peak_dbfs=0.0),
        ),
    )
    await rig.publish(meter)
    clipping = await next_alert(ws, "audio_clipping", "open")
    assert clipping["channel"] == 2

    # Offline opens device_offline.
    await rig.publish(OfflineBody(device_key=KEY))
    offline = await next_alert(ws, "device_offline", "open")
    assert offline["channel"] is None
    assert await eventually(lambda: rig.alert("open", "device_offline"), "device_offline listed")
    await ws.close()

    # History: battery samples from device state, RF and audio from meters, flushed and served.
    async def history(index: int) -> list[dict[str, Any]]:
        body = await rig.get(f"/devices/{device_id}/channels/{index}/history")
        return list(body["items"])

    def has(field: str) -> Callable[[list[dict[str, Any]]], bool]:
        return lambda points: any(p[field] is not None for p in points)

    ch1 = await eventually(lambda: _when(history(1), has("rf_dbm")), "RF history of channel 1")
    assert min(p["battery_bars"] for p in ch1 if p["battery_bars"] is not None) == 2
    assert max(p["rf_dbm"] for p in ch1 if p["rf_dbm"] is not None) == -62.0
    ch2 = await eventually(lambda: _when(history(2), has("audio_dbfs")), "audio history of channel 2")
    assert max(p["audio_dbfs"] for p in ch2 if p["audio_dbfs"] is not None) == -3.0


async def test_stale_agent_opens_and_clears_agent_stale_and_tells_live_views(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path
) -> None:
    async with running_rig(
        nats_private.url,
        sqlite_url,
        tmp_path,
        stale_check_interval_s=0.1,
        # The sweep would find the same by age; slow it down so the stale job is what is tested.
        alert_sweep_interval_s=60.0,
    ) as rig:
        # Subscribed before the agent is heard of, so that no message can come before it.
        ws = await rig.http.ws_connect(f"{rig.url}/api/v1/live")
        await ws.send_json({"type": "auth", "token": TOKEN})
        await ws.send_json({"type": "subscribe", "scope": "site", "site": SITE})
        assert (await next_message(ws))["type"] == "snapshot"
        await rig.publish(HeartbeatBody(uptime_s=1.0, interval_s=0.2))
        await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
        # Silent for three intervals: stale, with its alert, and the tiles told at once.
        stale = await next_alert(ws, "agent_stale", "open")
        assert stale["device_key"] is None
        statuses = await _channel_statuses(ws, "stale")
        assert statuses == {1: "stale", 2: "stale"}
        # Heard again: the alert resolves in the ingest transaction and the tiles come back.
        await rig.publish(HeartbeatBody(uptime_s=2.0, interval_s=60.0))
        back = await next_alert(ws, "agent_stale", "resolved")
        assert back["id"] == stale["id"]
        assert await _channel_statuses(ws, "online") == {1: "online", 2: "online"}
        await ws.close()


async def test_a_device_the_restarted_agent_no_longer_reports_goes_offline_with_its_alert(
    nats_private: EmbeddedNats, db_url: str, tmp_path: Path
) -> None:
    kept = receiver().model_copy(update={"device_key": "rx-kept"})
    async with running_rig(
        nats_private.url,
        db_url,
        tmp_path,
        stale_check_interval_s=0.1,
        unreported_device_after_s=1.0,
    ) as rig:
        await rig.publish(HelloBody(version="1"))
        await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
        await rig.publish(DeviceBody(device_key="rx-kept", snapshot=kept))
        await eventually(lambda: _count_online(rig, 2), "both devices online")
        ws = await rig.http.ws_connect(f"{rig.url}/api/v1/live")
        await ws.send_json({"type": "auth", "token": TOKEN})
        await ws.send_json({"type": "subscribe", "scope": "site", "site": SITE})
        assert (await next_message(ws))["type"] == "snapshot"
        # The agent restarts (a new boot) and reports only the receiver it still has.
        rig.factory = EnvelopeFactory(SITE, AGENT)
        await rig.publish(HelloBody(version="1"))
        await rig.publish(DeviceBody(device_key="rx-kept", snapshot=kept))
        started = time.monotonic()
        # The tiles and the alert, told live (in either order).
        opened: dict[str, Any] = {}
        tiles: dict[int, str] = {}
        deadline = started + 10
        while not opened or len(tiles) < 2:
            data = await next_message(ws, deadline - time.monotonic())
            item = data.get("item") or {}
            if data["type"] == "alert" and item["rule"] == "device_offline":
                opened = item
            elif data["type"] == "channel" and item["device_key"] == KEY and item["status"] == "offline":
                tiles[item["index"]] = item["status"]
        assert opened["device_key"] == KEY and opened["state"] == "open"
        # Not before the grace: the agent had a second to report it.
        assert time.monotonic() - started > 0.5
        statuses = {d["device_key"]: d["status"] for d in await _devices(rig)}
        assert statuses == {KEY: "offline", "rx-kept": "online"}
        # Reported again: online, and the alert resolves.
        await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
        resolved = await next_alert(ws, "device_offline", "resolved")
        assert resolved["id"] == opened["id"]
        await eventually(lambda: _count_online(rig, 2), "the device back online")
        await ws.close()


async def _agent_status(rig: Rig, status: str, agent: str = AGENT) -> bool:
    listed = (await rig.get("/agents"))["items"]
    return any(a["agent"] == agent and a["status"] == status for a in listed)


async def _count_online(rig: Rig, count: int) -> bool:
    online = [d for d in await _devices(rig) if d["status"] == "online"]
    return len(online) == count


async def _channel_statuses(ws: aiohttp.ClientWebSocketResponse, status: str) -> dict[int, str]:
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while set(seen.values()) != {status} or len(seen) < 2:
        data = await next_message(ws, deadline - time.monotonic())
        if data["type"] == "channel":
            seen[data["item"]["index"]] = data["item"]["status"]
    return seen


async def _devices(rig: Rig) -> list[dict[str, Any]]:
    body = await rig.get(f"/devices?site={SITE}")
    return list(body["items"])


async def _when(points: Awaitable[list[dict[str, Any]]], ok: Callable[[list[dict[str, Any]]], bool]) -> Any:
    found = await points
    return found if ok(found) else None


async def test_an_admin_forgets_an_offline_receiver_and_live_views_drop_its_tiles(rig: Rig) -> None:
    await rig.publish(HelloBody(version="1.0"))
    await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
    await rig.publish(DeviceBody(device_key=KEY, changes=battery(2, 20)))
    low = await eventually(lambda: rig.alert("open", "battery_low"), "the battery alert")
    [device] = await _devices(rig)
    device_id = device["id"]
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with rig.http.post(
        f"{rig.url}/api/v1/tokens", json={"name": "desk", "role": "operator"}, headers=admin
    ) as response:
        assert response.status == 201, await response.text()
        operator = {"Authorization": f"Bearer {(await response.json())['token']}"}
    arranged = {"name": "stage", "channels": [{"device_id": device_id, "index": i} for i in (2, 1)]}
    async with rig.http.post(f"{rig.url}/api/v1/groups", json=arranged, headers=admin) as response:
        assert response.status == 201, await response.text()

    async def forget(headers: dict[str, str], target: int = device_id) -> tuple[int, dict[str, Any]]:
        async with rig.http.delete(f"{rig.url}/api/v1/devices/{target}", headers=headers) as response:
            return response.status, (await response.json() if response.status != 204 else {})

    # Reported online: its agent would bring it back, so it is refused with the reason.
    status, problem = await forget(admin)
    assert (status, problem["code"]) == (409, "device.still_reported")
    assert "online" in problem["detail"] and KEY in problem["detail"]
    assert (await forget(operator))[0] == 403
    assert (await forget(admin, 999_999))[0] == 404

    ws = await rig.http.ws_connect(f"{rig.url}/api/v1/live")
    await ws.send_json({"type": "auth", "token": TOKEN})
    await ws.send_json({"type": "subscribe", "scope": "site", "site": SITE})
    assert (await next_message(ws))["type"] == "snapshot"
    await rig.publish(OfflineBody(device_key=KEY))
    await next_alert(ws, "device_offline", "open")
    assert (await forget(admin))[0] == 204
    removed: dict[str, Any] = {}
    resolved: set[str] = set()
    deadline = time.monotonic() + 10
    while not removed or resolved != {"battery_low", "battery_critical", "device_offline"}:
        data = await next_message(ws, deadline - time.monotonic())
        if data["type"] == "device_removed":
            removed = data["item"]
        elif data["type"] == "alert" and data["item"]["state"] == "resolved":
            resolved.add(data["item"]["rule"])
    assert removed == {"site": SITE, "agent": AGENT, "device_key": KEY, "device_id": device_id}
    assert await _devices(rig) == []
    assert (await rig.get(f"/channels?site={SITE}"))["items"] == []
    gone = await rig.get(f"/alerts?state=resolved&site={SITE}")
    assert {a["id"] for a in gone["items"]} >= {low["id"]}
    assert {a["resolved_by"] for a in gone["items"]} == {"bootstrap"}
    assert (await forget(admin))[0] == 404  # forgotten once
    # Out of the group it was arranged in (its id may go to the next new device).
    [group] = (await rig.get("/groups"))["items"]
    assert (group["name"], group["channels"]) == ("stage", [])
    # Reported again (put back on the network): a receiver like any new one.
    await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
    back = await eventually(lambda: _devices(rig), "the receiver reported again")
    assert back[0]["status"] == "online"
    await ws.close()


async def test_an_admin_forgets_a_retired_agent_and_nothing_of_it_comes_back(
    nats_private: EmbeddedNats, db_url: str, tmp_path: Path
) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with running_rig(
        nats_private.url,
        db_url,
        tmp_path,
        stale_check_interval_s=0.1,
        # The sweep reopens agent alerts of silent agents: running often, it would show one coming back.
        alert_sweep_interval_s=0.1,
    ) as rig:

        async def forget(agent: str) -> tuple[int, dict[str, Any]]:
            async with rig.http.post(
                f"{rig.url}/api/v1/agents/forget", json={"agent": agent}, headers=admin
            ) as response:
                return response.status, await response.json()

        await rig.publish(HelloBody(version="1"))
        await rig.publish(HeartbeatBody(uptime_s=1.0, interval_s=0.5))
        await rig.publish(DeviceBody(device_key=KEY, snapshot=receiver()))
        # Another venue whose agent never had a receiver.
        lone = EnvelopeFactory("venue-q", "pi-q")
        await rig.publisher.publish(lone.make(HeartbeatBody(uptime_s=1.0, interval_s=0.5)))
        await eventually(lambda: _count_online(rig, 1), "the receiver online")
        status, problem = await forget(AGENT)
        assert (status, problem["code"]) == (409, "agent.still_reporting")
        assert (await forget("nobody"))[1]["code"] == "agent.not_found"
        async with rig.http.post(f"{rig.url}/api/v1/agents/forget", json={"agent": "Not A Token"}) as r:
            assert r.status == 401  # no token: refused before the body is read
        # Retired: silent, so stale, with its alert.
        await eventually(lambda: rig.alert("open", "agent_stale"), "the agent's alert")
        await eventually(lambda: _agent_status(rig, "stale"), "the agent stale")
        ws = await rig.http.ws_connect(f"{rig.url}/api/v1/live")
        await ws.send_json({"type": "auth", "token": TOKEN})
        await ws.send_json({"type": "subscribe", "scope": "fleet"})
        assert (await next_message(ws))["type"] == "snapshot"
        status, gone = await forget(AGENT)
        assert status == 200, gone
        assert (gone["agent"], gone["site"], gone["devices"], gone["site_removed"]) == (
            AGENT,
            SITE,
            1,
            True,
        )
        assert gone["alerts_resolved"] >= 1
        removed: dict[str, Any] = {}
        sites_removed: set[str] = set()
        deadline = time.monotonic() + 10
        while removed.get("device_key") != KEY or SITE not in sites_removed:
            data = await next_message(ws, deadline - time.monotonic())
            if data["type"] == "device_removed":
                removed = data["item"]
            elif data["type"] == "site_removed":
                sites_removed.add(data["item"]["site"])
        # Without receivers, the periodic site refresh tells it (every 5 s).
        await eventually(lambda: _agent_status(rig, "stale", "pi-q"), "the lone agent stale")
        status, lone_gone = await forget("pi-q")
        assert (status, lone_gone["devices"], lone_gone["site_removed"]) == (200, 0, True)
        while "venue-q" not in sites_removed:
            data = await next_message(ws, deadline + 8 - time.monotonic())
            if data["type"] == "site_removed":
                sites_removed.add(data["item"]["site"])
        assert (await rig.get("/sites"))["items"] == []
        assert (await rig.get("/agents"))["items"] == []
        assert await _devices(rig) == []
        # Several sweeps later nothing of it is open again.
        await asyncio.sleep(0.5)
        assert (await rig.get("/alerts?state=open"))["items"] == []
        assert (await forget(AGENT))[1]["code"] == "agent.not_found"
        await ws.close()
