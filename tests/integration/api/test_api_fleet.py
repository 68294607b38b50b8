"""Sites, agents, devices and channels: content, filters, sorting, pagination and query budget."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, insert

from micboard.collector.services import fleet as fleet_module
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.fleet import FleetView
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.store.schema_alerts import alerts, history_samples
from micboard.shared.envelope import DeviceBody, DeviceEvent
from micboard.shared.model import Family, Vendor

if TYPE_CHECKING:
    from tests.live_api import LiveApi


async def _fleet(api: LiveApi) -> None:
    await api.seed.devices(
        "venue-a", "pi-a", [api.receiver("rx1", bars=(5, 4)), api.receiver("rx2", bars=(3, None))]
    )
    await api.seed.devices(
        "venue-b",
        "pi-b",
        [
            api.receiver("ew1", model="EW-DX EM 2", vendor=Vendor.SENNHEISER, family=Family.EWDX, bars=(1,)),
            api.receiver("ew2", model="EW-DX EM 4", vendor=Vendor.SENNHEISER, family=Family.EWDX, bars=(5,)),
        ],
    )
    await api.seed.devices("venue-c", "pi-c", [api.receiver("qx1", bars=(4,), names=["Vox 1"])])
    await api.seed.offline("venue-c", "pi-c", "qx1")


async def _alert(api: LiveApi, site: str, severity: str, *, state: str = "open") -> int:
    now = int(time.time_ns() // 1_000_000)
    async with api.engine.begin() as conn:
        result = await conn.execute(
            insert(alerts).values(
                site=site,
                agent="pi-x",
                device_key="rx",
                channel=1,
                target=f"pi-x/rx/1/{site}/{severity}/{state}",
                rule="battery_critical" if severity == "critical" else "battery_low",
                severity=severity,
                state=state,
                message=f"{severity} at {site}",
                opened_ms=now,
                observed_ms=now,
                updated_ms=now,
            )
        )
        key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


async def test_sites_are_counted_and_worst_first(api: LiveApi) -> None:
    await _fleet(api)
    await _alert(api, "venue-b", "critical")
    await _alert(api, "venue-b", "warning", state="acknowledged")
    await _alert(api, "venue-a", "warning", state="resolved")
    status, body = await api.get("/api/v1/sites")
    assert status == 200
    assert [s["site"] for s in body["items"]] == ["venue-b", "venue-c", "venue-a"]
    b, c, a = body["items"]
    assert b["worst"] == "critical" and b["open_alerts"] == 2 and b["channels"] == 2
    assert c["worst"] == "offline" and c["devices"] == {"online": 0, "offline": 1, "stale": 0}
    assert a["worst"] == "ok" and a["devices"]["online"] == 2 and a["channels"] == 4 and a["open_alerts"] == 0
    assert body["total"] == 3 and body["limit"] == 100 and body["offset"] == 0
    _, by_name = await api.get("/api/v1/sites", sort="-site")
    assert [s["site"] for s in by_name["items"]] == ["venue-c", "venue-b", "venue-a"]
    _, only_ok = await api.get("/api/v1/sites", worst="ok")
    assert [s["site"] for s in only_ok["items"]] == ["venue-a"]


async def test_alerts_say_what_the_receiver_and_channel_are_called_now(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(2,))])
    now = int(time.time_ns() // 1_000_000)
    async with api.engine.begin() as conn:
        for channel in (1, 7, None):  # a channel, one the receiver lacks, the receiver itself
            await conn.execute(
                insert(alerts).values(
                    site="venue-a", agent="pi-a", device_key="rx1", channel=channel,
                    target=f"pi-a/rx1/{channel}", rule="battery_low", severity="warning",
                    state="open", message="low", opened_ms=now, observed_ms=now, updated_ms=now,
                )
            )  # fmt: skip
    _, devices_ = await api.get("/api/v1/devices", site="venue-a")
    [device] = devices_["items"]
    _, body = await api.get("/api/v1/alerts", site="venue-a")
    labels = {item["channel"]: (item["device_name"], item["channel_name"]) for item in body["items"]}
    named = device["name"] or device["model"]
    assert named and labels == {1: (named, "HH01 Person1"), 7: (named, None), None: (named, None)}


async def test_agents(api: LiveApi) -> None:
    await _fleet(api)
    _, body = await api.get("/api/v1/agents", site="venue-b")
    assert [a["agent"] for a in body["items"]] == ["pi-b"]
    assert body["items"][0]["version"] == "1.0" and body["items"][0]["hostname"] == "pi-b.local"
    # Up since its hello (the agent's clock): within this test's run.
    assert 0 < time.time() * 1000 - body["items"][0]["started_ms"] < 600_000
    _, body = await api.get("/api/v1/agents", sort="-agent")
    assert [a["agent"] for a in body["items"]] == ["pi-c", "pi-b", "pi-a"]
    # Each agent's receivers by the state the desk sees.
    counts = {a["agent"]: a["devices"] for a in body["items"]}
    assert counts == {
        "pi-a": {"online": 2, "offline": 0, "stale": 0},
        "pi-b": {"online": 2, "offline": 0, "stale": 0},
        "pi-c": {"online": 0, "offline": 1, "stale": 0},
    }
    async with api.engine.begin() as conn:
        await SynchronizationService().mark_stale_agents(conn, int(time.time() * 1000) + 3_600_000)
    _, body = await api.get("/api/v1/agents", site="venue-a", limit=1)
    assert body["items"][0]["devices"] == {"online": 0, "offline": 0, "stale": 2}


async def test_device_filters_sorting_and_detail(api: LiveApi) -> None:
    await _fleet(api)
    _, body = await api.get("/api/v1/devices")
    assert body["total"] == 5
    assert [d["device_key"] for d in body["items"]] == ["rx1", "rx2", "ew1", "ew2", "qx1"]
    _, body = await api.get("/api/v1/devices", vendor="sennheiser")
    assert {d["device_key"] for d in body["items"]} == {"ew1", "ew2"}
    _, body = await api.get("/api/v1/devices", status="offline")
    assert [d["device_key"] for d in body["items"]] == ["qx1"]
    _, body = await api.get("/api/v1/devices", q="em 4")
    assert [d["device_key"] for d in body["items"]] == ["ew2"]
    _, body = await api.get("/api/v1/devices", q="%")
    assert body["items"] == []
    _, body = await api.get("/api/v1/devices", low_battery="true")
    assert {d["device_key"] for d in body["items"]} == {"rx2", "ew1"}
    _, body = await api.get("/api/v1/devices", low_battery="false", site="venue-a")
    assert [d["device_key"] for d in body["items"]] == ["rx1"]
    _, body = await api.get("/api/v1/devices", sort="-name")
    assert [d["name"] for d in body["items"]] == ["RX2", "RX1", "QX1", "EW2", "EW1"]
    first = body["items"][0]
    status, detail = await api.get(f"/api/v1/devices/{first['id']}")
    assert status == 200
    assert (
        detail["channel_count"] == 2 and detail["device"]["channels"][0]["transmitter"]["battery_bars"] == 3
    )
    assert {k: v for k, v in detail.items() if k != "device"} == first


async def test_pagination(api: LiveApi) -> None:
    await _fleet(api)
    seen = []
    for offset in range(0, 5, 2):
        _, page = await api.get("/api/v1/devices", limit=2, offset=offset, sort="id")
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        seen += [d["id"] for d in page["items"]]
    assert seen == sorted(seen) and len(set(seen)) == 5
    _, past = await api.get("/api/v1/devices", limit=2, offset=50)
    assert past["items"] == [] and past["total"] == 5
    _, page = await api.get("/api/v1/channels", limit=1000)
    assert page["total"] == 7 and len(page["items"]) == 7


async def test_channels_carry_transmitter_and_battery_state(api: LiveApi) -> None:
    await _fleet(api)
    _, body = await api.get("/api/v1/channels", site="venue-a")
    states = {(c["device_key"], c["index"]): c["battery_state"] for c in body["items"]}
    assert states == {("rx1", 1): "good", ("rx1", 2): "good", ("rx2", 1): "replace", ("rx2", 2): "unknown"}
    rx2_2 = next(c for c in body["items"] if c["device_key"] == "rx2" and c["index"] == 2)
    assert rx2_2["tx"] is None and rx2_2["name_id"] == "HH02" and rx2_2["name_person"] == "Person2"
    rx1_1 = body["items"][0]
    assert rx1_1["tx"] == {
        "model": "ULXD2",
        "battery_bars": 5,
        "battery_percent": 100,
        "runtime_min": 300,
        "battery_type": "LION",
        "muted": False,
    }
    assert (
        rx1_1["frequency_khz"] == 470_100 and rx1_1["group_channel"] == "1,1" and rx1_1["status"] == "online"
    )
    _, body = await api.get("/api/v1/channels", q="vox")
    assert [(c["device_key"], c["name_id"], c["name_person"]) for c in body["items"]] == [
        ("qx1", None, "Vox 1")
    ]
    _, body = await api.get("/api/v1/channels", status="offline")
    assert [c["device_key"] for c in body["items"]] == ["qx1"]
    # Its 4 bars are what it said before it went offline, not a battery that is good now.
    [qx1] = body["items"]
    assert qx1["tx"]["battery_bars"] == 4 and qx1["battery_state"] == "previously_good"
    _, body = await api.get("/api/v1/channels", device_id=1)
    assert {c["device_key"] for c in body["items"]} == {"rx1"}
    _, body = await api.get("/api/v1/channels", sort="battery_percent", site="venue-a")
    assert [c["tx"]["battery_percent"] if c["tx"] else None for c in body["items"]] == [60, 80, 100, None]
    _, body = await api.get("/api/v1/channels", sort="-battery_percent", site="venue-a")
    assert [c["tx"]["battery_percent"] if c["tx"] else None for c in body["items"]] == [100, 80, 60, None]


async def test_a_site_with_its_own_battery_thresholds_shows_tiles_by_them(
    api: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_module, "BANDS_CACHE_S", 0.0)  # read the thresholds at every listing
    for site in ("main-hall", "studio"):
        await api.seed.devices(site, f"pi-{site}", [api.receiver("rx1", bars=(3, 2, 4))])
    alerts = AlertService(api.engine)
    # A louder hall changes batteries later: replace at 2 bars, critical at 1 (and 0 %).
    await alerts.set_site_thresholds(
        "main-hall",
        {"battery_replace_bars": 2, "battery_critical_bars": 1, "battery_critical_percent": 0},
    )
    await alerts.set_site_thresholds("studio", {"clip_dbfs": -0.5})  # nothing about batteries

    async def states(site: str) -> list[str]:
        _, body = await api.get("/api/v1/channels", site=site)
        return [c["battery_state"] for c in body["items"]]

    assert await states("main-hall") == ["good", "replace", "good"]
    assert await states("studio") == ["replace", "critical", "good"]
    # Back to the defaults: so are its tiles.
    await alerts.clear_site_thresholds("main-hall")
    assert await states("main-hall") == ["replace", "critical", "good"]


async def test_unknown_battery_with_a_recent_reading_is_previously_known(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(None, None))])
    now = int(time.time_ns() // 1_000_000)
    async with api.engine.begin() as conn:
        await conn.execute(
            insert(history_samples),
            [
                {
                    "site": "venue-a",
                    "agent": "pi-a",
                    "device_key": "rx1",
                    "channel": 1,
                    "bucket_ms": now - 120_000,
                    "battery_bars": 5,
                    "samples": 1,
                },
                {
                    "site": "venue-a",
                    "agent": "pi-a",
                    "device_key": "rx1",
                    "channel": 1,
                    "bucket_ms": now - 60_000,
                    "battery_bars": 2,
                    "samples": 1,
                },
                {
                    "site": "venue-a",
                    "agent": "pi-a",
                    "device_key": "rx1",
                    "channel": 2,
                    "bucket_ms": now - 3_600_000,
                    "battery_bars": 5,
                    "samples": 1,
                },
            ],
        )
    _, body = await api.get("/api/v1/channels")
    assert [c["battery_state"] for c in body["items"]] == ["previously_critical", "unknown"]


@contextmanager
def count_statements(api: LiveApi) -> Iterator[list[str]]:
    statements: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(api.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(api.engine.sync_engine, "before_cursor_execute", before)


async def test_list_endpoints_keep_to_their_query_budget(api: LiveApi) -> None:
    await _fleet(api)
    for site in range(8):
        devices = [api.receiver(f"d{site}-{n}", bars=(5, 4, 3, None)) for n in range(6)]
        await api.seed.devices(f"site-{site}", f"agent-{site}", devices)
    await _alert(api, "site-1", "critical")
    # The token is verified once and then cached, and so are the sites' battery bands (read
    # again every BANDS_CACHE_S): what is counted below is the endpoint's own work.
    assert (await api.get("/api/v1/sites"))[0] == 200
    assert (await api.get("/api/v1/channels", limit=1))[0] == 200
    for path in [
        "/api/v1/sites",
        "/api/v1/agents",
        "/api/v1/devices",
        "/api/v1/channels",
        "/api/v1/alerts",
        "/api/v1/groups",
    ]:
        for limit in (1, 1000):
            with count_statements(api) as statements:
                status, body = await api.get(path, limit=limit)
            assert status == 200, body
            assert len(statements) == 1, (path, limit, statements)
        with count_statements(api) as statements:
            status, body = await api.get(path, limit=5, offset=100_000)
        assert status == 200 and body["items"] == []
        assert len(statements) <= 2, (path, statements)
    with count_statements(api) as statements:
        _, body = await api.get("/api/v1/channels", limit=1000)
    assert body["total"] == 7 + 8 * 6 * 4 and len(body["items"]) == body["total"] and len(statements) == 1


async def test_channels_where_reads_single_channels_by_agent_device_and_index(api: LiveApi) -> None:
    # What the live feed reads after a channel-only delta: just the named channels, with the
    # group/channel and battery type of the channel rows.
    await api.seed.devices(
        "venue-cw", "pi-cw", [api.receiver("rx1", bars=(5, 4, 3)), api.receiver("rx2", bars=(2,))]
    )
    fleet = FleetView(api.engine)
    items = await fleet.channels_where(
        channel_keys=[("pi-cw", "rx1", 2), ("pi-cw", "rx2", 1), ("pi-cw", "rx9", 1)]
    )
    assert [(i["device_key"], i["index"], i["group_channel"], i["tx"]["battery_type"]) for i in items] == [
        ("rx1", 2, "1,2", "LION"),
        ("rx2", 1, "1,1", "LION"),
    ]
    assert await FleetView(api.engine).channels_where(channel_keys=[]) == []


async def test_items_built_from_a_committed_state_equal_the_items_read_back(api: LiveApi) -> None:
    # The live feed builds a channel-only delta's items from the state the batch committed
    # instead of reading them back: they must be exactly what a read returns.
    await api.seed.devices("venue-cs", "pi-cs", [api.receiver("rx1", bars=(5, 4, None))])
    tx = {
        "model": "ULXD2",
        "battery_bars": 1,
        "battery_percent": 9,
        "runtime_min": 12,
        "battery_type": "NIMH",
    }
    delta = {"channels": {1: {"transmitter": tx, "name": "HH07 Zed"}, 2: {"frequency_khz": 512_000}}}
    delta_event = DeviceEvent(
        site="venue-cs", agent="pi-cs", boot="b1", seq=api.seed.seq["pi-cs"] + 1, ts=1,
        body=DeviceBody(device_key="rx1", changes=delta),
    )  # fmt: skip
    async with api.engine.begin() as conn:
        changes = await SynchronizationService().apply_batch_changes(conn, [delta_event])
    (change,) = changes.devices
    built, unread = FleetView(api.engine).committed_channel_items(change, [1, 2, 3])
    assert unread == {3}  # no transmitter: its battery state needs the history
    read = await FleetView(api.engine).channels_where(channel_keys=[("pi-cs", "rx1", 1), ("pi-cs", "rx1", 2)])
    assert built == read
    assert (built[0]["name_id"], built[0]["tx"]["battery_type"], built[1]["frequency_khz"]) == (
        "HH07",
        "NIMH",
        512_000,
    )
    # The transmitter on channel 1 goes: its last reading (1 bar) is the change's own "before",
    # newer than anything history holds, so the tile reads previously critical at once.
    gone = DeviceEvent(
        site="venue-cs", agent="pi-cs", boot="b1", seq=delta_event.seq + 1, ts=2,
        body=DeviceBody(device_key="rx1", changes={"channels": {1: {"transmitter": None}}}),
    )  # fmt: skip
    async with api.engine.begin() as conn:
        (went,) = (await SynchronizationService().apply_batch_changes(conn, [gone])).devices
    built, unread = FleetView(api.engine).committed_channel_items(went, [1, 3])
    assert unread == {3}  # no transmitter before either: history decides
    assert [(i["index"], i["tx"], i["battery_state"]) for i in built] == [(1, None, "previously_critical")]
    # Without a row id (a change not written), everything is read.
    assert FleetView(api.engine).committed_channel_items(dataclasses.replace(change, pk=None), [1]) == (
        [],
        {1},
    )
