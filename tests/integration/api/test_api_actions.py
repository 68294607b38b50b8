"""Alerts (list, acknowledge, resolve), groups, channel history and commands through the API."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.msg import Msg
from sqlalchemy import insert

from micboard.collector.api.context import context_of
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.history import HistoryService
from micboard.collector.store.schema_alerts import alerts
from micboard.shared.codec import decode, encode
from micboard.shared.envelope import CommandEvent, CommandOutcome, CommandResult, MeterBody
from micboard.shared.model import ChannelMeter

if TYPE_CHECKING:
    from tests.live_api import LiveApi


async def _open_alert(
    api: LiveApi, site: str = "venue-a", opened_ms: int | None = None, severity: str = "critical"
) -> int:

    now = opened_ms or int(time.time_ns() // 1_000_000)
    async with api.engine.begin() as conn:
        result = await conn.execute(
            insert(alerts).values(
                site=site,
                agent="pi-a",
                device_key="rx1",
                channel=1,
                target=f"pi-a/rx1/1/{now}/{severity}",
                rule="battery_critical",
                severity=severity,
                state="open",
                message="HH01 battery critical",
                opened_ms=now,
                observed_ms=now,
                updated_ms=now,
            )
        )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


async def test_alert_lifecycle(api: LiveApi) -> None:
    first = await _open_alert(api, opened_ms=1_000)
    second = await _open_alert(api, site="venue-b", opened_ms=2_000, severity="warning")
    _, listing = await api.get("/api/v1/alerts")
    assert [a["id"] for a in listing["items"]] == [second, first]
    _, listing = await api.get("/api/v1/alerts", site="venue-a", state="open")
    assert [a["id"] for a in listing["items"]] == [first]
    _, listing = await api.get("/api/v1/alerts", sort="-severity")
    assert [a["id"] for a in listing["items"]] == [first, second]

    status, item, _ = await api.call("POST", f"/api/v1/alerts/{first}/acknowledge", role="operator")
    assert status == 200 and item["state"] == "acknowledged" and item["acknowledged_by"] == "test-operator"
    assert item["acknowledged_ms"] is not None and item["message"] == "HH01 battery critical"
    status, body, _ = await api.call("POST", f"/api/v1/alerts/{first}/acknowledge", role="operator")
    assert status == 409 and body["code"] == "alert.invalid_transition"
    status, item, _ = await api.call("POST", f"/api/v1/alerts/{first}/resolve", role="admin")
    assert status == 200 and item["state"] == "resolved" and item["resolved_by"] == "test-admin"
    status, body, _ = await api.call("POST", f"/api/v1/alerts/{first}/resolve", role="operator")
    assert status == 409
    _, listing = await api.get("/api/v1/alerts", state="resolved")
    assert [a["id"] for a in listing["items"]] == [first]


async def test_a_sites_alert_thresholds_are_read_and_changed_by_an_admin(api: LiveApi) -> None:
    await api.seed.devices("main-hall", "pi-m", [api.receiver("rx1", bars=(3,))])
    status, item = await api.get("/api/v1/thresholds", site="main-hall")
    assert status == 200 and item["site"] == "main-hall" and item["overrides"] == {}
    assert (item["in_force"]["battery_replace_bars"], item["in_force"]["clip_dbfs"]) == (3, -1.0)
    assert item["defaults"] == item["in_force"]
    assert (await api.get("/api/v1/channels", site="main-hall"))[1]["items"][0]["battery_state"] == "replace"

    change = {"site": "main-hall", "values": {"battery_replace_bars": 2, "battery_critical_bars": 1}}
    status, body, _ = await api.call("PUT", "/api/v1/thresholds", role="operator", json=change)
    assert status == 403
    status, item, _ = await api.call("PUT", "/api/v1/thresholds", role="admin", json=change)
    assert status == 200, item
    assert item["overrides"] == {"battery_replace_bars": 2, "battery_critical_bars": 1}
    assert item["in_force"]["battery_replace_bars"] == 2
    assert item["defaults"]["battery_replace_bars"] == 3
    # The tiles of the hall follow at once in this process (the others within 5 s), and so do alerts.
    assert (await api.get("/api/v1/channels", site="main-hall"))[1]["items"][0]["battery_state"] == "good"
    async with api.engine.connect() as conn:
        assert (await AlertService(api.engine).thresholds_for(conn, "main-hall")).battery_replace_bars == 2

    # Another change keeps what it does not name; a reset drops one override.
    change = {"site": "main-hall", "values": {"clip_dbfs": -0.5}, "reset": ["battery_critical_bars"]}
    status, item, _ = await api.call("PUT", "/api/v1/thresholds", role="admin", json=change)
    assert status == 200 and item["overrides"] == {"battery_replace_bars": 2, "clip_dbfs": -0.5}
    assert item["in_force"]["battery_critical_bars"] == 2

    # Refused, and nothing stored: an unknown name, a critical bound over the replace one, a
    # fraction of a bar, a value out of range, an unknown site token.
    for bad in (
        {"site": "main-hall", "values": {"battery_replace_volts": 1}},
        {"site": "main-hall", "reset": ["nope"]},
        {"site": "main-hall", "values": {"battery_critical_bars": 3}},
        {"site": "main-hall", "values": {"battery_replace_bars": 2.5}},
        {"site": "main-hall", "values": {"rf_min_dbm": 10}},
        {"site": "main-hall", "values": {"resolve_hold_s": 1e308}},  # would overflow as milliseconds
        {"site": "Main Hall", "values": {"clip_dbfs": -0.5}},
    ):
        status, body, _ = await api.call("PUT", "/api/v1/thresholds", role="admin", json=bad)
        assert status == 400, (bad, body)
        assert body["code"] in ("alert_rules.invalid", "request.invalid_body"), body
    assert (await api.get("/api/v1/thresholds", site="main-hall"))[1]["overrides"] == {
        "battery_replace_bars": 2,
        "clip_dbfs": -0.5,
    }
    # Dropping every override: the defaults again.
    change = {"site": "main-hall", "reset": ["battery_replace_bars", "clip_dbfs"]}
    status, item, _ = await api.call("PUT", "/api/v1/thresholds", role="admin", json=change)
    assert status == 200 and item["overrides"] == {} and item["in_force"]["battery_replace_bars"] == 3
    assert (await api.get("/api/v1/thresholds"))[0] == 400  # whose thresholds: the site is required


async def test_groups_persist_in_order(api: LiveApi) -> None:
    body = {
        "name": "Band",
        "site": "venue-a",
        "channels": [{"device_id": 1, "index": 2}, {"device_id": 1, "index": 1}],
        "position": 2,
    }
    status, band, _ = await api.call("POST", "/api/v1/groups", role="operator", json=body)
    assert status == 201 and band["channels"] == body["channels"] and band["position"] == 2
    status, vox, _ = await api.call(
        "POST", "/api/v1/groups", role="operator", json={"name": "Vox", "position": 1}
    )
    assert status == 201 and vox["site"] is None and vox["channels"] == []
    _, listing = await api.get("/api/v1/groups")
    assert [g["name"] for g in listing["items"]] == ["Vox", "Band"] and listing["total"] == 2
    _, listing = await api.get("/api/v1/groups", site="venue-a")
    assert [g["name"] for g in listing["items"]] == ["Band"]
    status, changed, _ = await api.call(
        "PUT", f"/api/v1/groups/{band['id']}", role="operator", json={**body, "name": "Band L", "position": 0}
    )
    assert status == 200 and changed["name"] == "Band L"
    _, listing = await api.get("/api/v1/groups")
    assert [g["name"] for g in listing["items"]] == ["Band L", "Vox"]
    assert (await api.call("DELETE", f"/api/v1/groups/{vox['id']}", role="operator"))[0] == 204
    _, listing = await api.get("/api/v1/groups")
    assert [g["id"] for g in listing["items"]] == [band["id"]]
    # A name of blanks alone, or a channel twice, is refused.
    channels: list[dict[str, int]] = [{"device_id": 1, "index": 2}]
    bad_bodies: list[dict[str, Any]] = [{"name": "   "}, {"name": "Twice", "channels": channels * 2}]
    for bad in bad_bodies:
        status, problem, _ = await api.call("POST", "/api/v1/groups", role="operator", json=bad)
        assert status == 400 and problem["code"] == "request.invalid_body", problem
    assert "in the group twice" in problem["detail"]


async def test_channel_history(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(4, 5))])
    history = HistoryService(api.engine)
    start = int(time.time_ns() // 1_000_000) - 10 * 60_000
    for minute, bars in enumerate((4, 4, 3, 2)):
        at = start + minute * 60_000
        history.record_device("venue-a", "pi-a", api.receiver("rx1", bars=(bars, 5)), now_ms=at)
        meter = MeterBody(
            device_key="rx1", channels=(ChannelMeter(index=1, rf_dbm=(-60.0, -70.0), audio_dbfs=-20.0),)
        )
        history.record_meter("venue-a", "pi-a", meter, now_ms=at)
        # A dropout and a peak within the same minute: the bucket keeps both extremes.
        dip = MeterBody(
            device_key="rx1",
            channels=(ChannelMeter(index=1, rf_dbm=(-95.0, None), audio_dbfs=-30.0, audio_peak_dbfs=-1.5),),
        )
        history.record_meter("venue-a", "pi-a", dip, now_ms=at + 1_000)
    await history.flush()
    status, body = await api.get("/api/v1/devices/1/channels/1/history", from_ms=start - 60_000)
    assert status == 200
    points = body["items"]
    assert [p["battery_bars"] for p in points] == [4, 4, 3, 2]
    assert points[0]["rf_dbm"] == -60.0 and points[0]["audio_dbfs"] == -20.0
    assert points[0]["rf_dbm_min"] == -95.0 and points[0]["audio_peak_dbfs"] == -1.5
    assert points == sorted(points, key=lambda p: p["ts_ms"])
    _, coarse = await api.get(
        "/api/v1/devices/1/channels/1/history", from_ms=start - 600_000, resolution_s=3600
    )
    assert 1 <= len(coarse["items"]) <= 2
    _, empty = await api.get("/api/v1/devices/1/channels/2/history", from_ms=0, to_ms=1000)
    assert empty == {"items": []}


async def test_history_of_a_channel_the_device_no_longer_has_is_still_served(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(4, 5, 3, 2))])
    at = int(time.time_ns() // 1_000_000) - 5 * 60_000
    # Channel 3's samples are stored; channel 4's still wait in the answering process.
    stored = HistoryService(api.engine)
    stored.record_battery("venue-a", "pi-a", "rx1", [(3, 60, 3)], now_ms=at)
    await stored.flush()
    answering = context_of(api.app).history
    assert answering is not None
    answering.record_battery("venue-a", "pi-a", "rx1", [(4, 40, 2)], now_ms=at)
    # Swapped for a two-channel receiver at the same address.
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(4, 5))])
    _, listed = await api.get("/api/v1/channels", device_id=1)
    assert [c["index"] for c in listed["items"]] == [1, 2]
    for index, percent in ((3, 60), (4, 40)):
        status, body = await api.get(f"/api/v1/devices/1/channels/{index}/history", from_ms=at - 60_000)
        assert status == 200, body
        assert [p["battery_percent"] for p in body["items"]] == [percent]
    # A channel it never had, with no history, is not found.
    status, body = await api.get("/api/v1/devices/1/channels/5/history", from_ms=at - 60_000)
    assert status == 404 and body["code"] == "device.channel_not_found"


async def test_commands_reach_the_agent_and_report_its_outcome(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1")])
    status, body, _ = await api.call(
        "POST", "/api/v1/devices/1/commands", role="operator", json={"action": "identify"}
    )
    assert status == 200 and body["outcome"] == "agent_unreachable"

    received: list[CommandEvent] = []
    agent = await nats.connect(api.nc.connected_url.geturl() if api.nc.connected_url else "")

    async def answer(msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, CommandEvent)
        received.append(event)
        outcome = CommandOutcome.OK if event.body.action.value == "rename" else CommandOutcome.NOT_SUPPORTED
        await msg.respond(
            encode(CommandResult(request_id=event.body.request_id, outcome=outcome, detail="done"))
        )

    await agent.subscribe("micboard.v1.venue-a.pi-a.cmd", cb=answer)
    await agent.flush()
    try:
        status, body, _ = await api.call(
            "POST",
            "/api/v1/devices/1/commands",
            role="operator",
            json={"action": "rename", "channel": 1, "value": "HH01 Ada"},
        )
        assert status == 200 and body == {"outcome": "ok", "detail": "done"}
        status, body, _ = await api.call(
            "POST", "/api/v1/devices/1/commands", role="operator", json={"action": "mute", "channel": 2}
        )
        assert body["outcome"] == "not_supported"
    finally:
        await agent.close()
    assert [(e.body.action.value, e.body.channel, e.body.value) for e in received] == [
        ("rename", 1, "HH01 Ada"),
        ("mute", 2, None),
    ]
    assert received[0].body.device_key == "rx1"
