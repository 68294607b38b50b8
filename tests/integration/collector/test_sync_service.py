"""SynchronizationService on SQLite and PostgreSQL: idempotence, ordering, offline."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.services.devices import DeviceFilter, DeviceService
from micboard.collector.services.sync import UNREPORTED_WINDOW_MS, ApplyOutcome, SynchronizationService
from micboard.collector.store.schema import agents, applied_events, channels, devices, discovered
from micboard.shared.envelope import (
    AnyEvent,
    DeviceBody,
    DeviceEvent,
    DiscoveredBody,
    DiscoveredEvent,
    HeartbeatBody,
    HeartbeatEvent,
    HelloBody,
    HelloEvent,
    OfflineBody,
    OfflineEvent,
)
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor


def envelope(seq: int, *, boot: str = "b1", ts: int | None = None, agent: str = "pi-1") -> dict[str, Any]:
    return {
        "site": "venue",
        "agent": agent,
        "boot": boot,
        "seq": seq,
        "ts": ts if ts is not None else 1000 + seq,
    }


def device(name: str = "HH01 Fatai", bars: int = 4) -> Device:
    return Device(
        device_key="dev-1",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4",
        channels=(ReceiverChannel(index=1, name=name, transmitter=Transmitter(battery_bars=bars)),),
    )


async def apply(engine: AsyncEngine, event: AnyEvent) -> ApplyOutcome:
    async with engine.begin() as conn:
        return (await SynchronizationService().apply(conn, event)).outcome


async def stored(engine: AsyncEngine) -> list[dict[str, Any]]:
    return await DeviceService(engine).list_devices()


async def test_hello_snapshot_delta_offline(engine: AsyncEngine) -> None:
    assert (
        await apply(engine, HelloEvent(**envelope(1), body=HelloBody(version="1", hostname="pi")))
        == "applied"
    )
    snap = DeviceEvent(**envelope(2), body=DeviceBody(device_key="dev-1", snapshot=device()))
    assert await apply(engine, snap) is ApplyOutcome.APPLIED
    delta = DeviceEvent(
        **envelope(3), body=DeviceBody(device_key="dev-1", changes={"channels": {1: {"name": "HH01 Ines"}}})
    )
    assert await apply(engine, delta) is ApplyOutcome.APPLIED
    [row] = await stored(engine)
    assert row["device"]["channels"][0]["name"] == "HH01 Ines"
    assert row["status"] == "online"
    async with engine.connect() as conn:
        channel = (await conn.execute(select(channels))).mappings().one()
    assert (channel["name_id"], channel["name_person"], channel["battery_bars"]) == ("HH01", "Ines", 4)
    assert await apply(engine, OfflineEvent(**envelope(4), body=OfflineBody(device_key="dev-1"))) == "applied"
    [row] = await stored(engine)
    assert row["status"] == "offline"
    assert await DeviceService(engine).list_devices(DeviceFilter(status="online")) == []
    assert len(await DeviceService(engine).list_devices(DeviceFilter(site="venue", vendor="shure"))) == 1


async def test_duplicates_are_no_ops(engine: AsyncEngine) -> None:
    snap = DeviceEvent(**envelope(1), body=DeviceBody(device_key="dev-1", snapshot=device()))
    assert await apply(engine, snap) is ApplyOutcome.APPLIED
    assert await apply(engine, snap) is ApplyOutcome.DUPLICATE
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(applied_events))).scalar_one() == 1
        assert (await conn.execute(select(func.count()).select_from(devices))).scalar_one() == 1


async def test_older_events_do_not_overwrite_newer_state(engine: AsyncEngine) -> None:
    new = DeviceEvent(**envelope(5), body=DeviceBody(device_key="dev-1", snapshot=device("HH01 New")))
    old = DeviceEvent(**envelope(4), body=DeviceBody(device_key="dev-1", snapshot=device("HH01 Old")))
    assert await apply(engine, new) is ApplyOutcome.APPLIED
    assert await apply(engine, old) is ApplyOutcome.OUTDATED
    assert (
        await apply(engine, OfflineEvent(**envelope(3), body=OfflineBody(device_key="dev-1"))) == "outdated"
    )
    # Across boots the sender clock decides.
    stale_boot = DeviceEvent(
        **envelope(9, boot="b0", ts=10),
        body=DeviceBody(device_key="dev-1", snapshot=device("HH01 Older boot")),
    )
    assert await apply(engine, stale_boot) is ApplyOutcome.OUTDATED
    next_boot = DeviceEvent(
        **envelope(1, boot="b2", ts=99_999),
        body=DeviceBody(device_key="dev-1", snapshot=device("HH01 Next boot")),
    )
    assert await apply(engine, next_boot) is ApplyOutcome.APPLIED
    [row] = await stored(engine)
    assert row["device"]["channels"][0]["name"] == "HH01 Next boot"


async def test_delta_for_unknown_device_is_deferred_and_offline_rejected(engine: AsyncEngine) -> None:
    delta = DeviceEvent(**envelope(1), body=DeviceBody(device_key="ghost", changes={"model": "X"}))
    # A delta before its snapshot (reordered delivery) is not recorded, so its redelivery applies.
    assert await apply(engine, delta) is ApplyOutcome.DEFERRED
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(applied_events))).scalar_one() == 0
    assert (
        await apply(engine, OfflineEvent(**envelope(2), body=OfflineBody(device_key="ghost"))) == "rejected"
    )
    snap = DeviceEvent(
        **envelope(0),
        body=DeviceBody(device_key="ghost", snapshot=device().model_copy(update={"device_key": "ghost"})),
    )
    assert await apply(engine, snap) is ApplyOutcome.APPLIED
    assert await apply(engine, delta) is ApplyOutcome.APPLIED
    [row] = await stored(engine)
    assert row["device"]["model"] == "X"
    extra = DeviceEvent(
        **envelope(4),
        body=DeviceBody(device_key="ghost", changes={"channels": {2: {"transmitter": {"battery_bars": 3}}}}),
    )
    # Channel 2 does not exist yet: the merge creates it, complete, which is valid.
    assert await apply(engine, extra) is ApplyOutcome.APPLIED
    [row] = await stored(engine)
    second = row["device"]["channels"][1]
    assert Device.model_validate(row["device"]).channel(2) is not None
    assert second["transmitter"]["battery_bars"] == 3 and second["transmitter"]["battery_percent"] is None


async def test_heartbeat_updates_agent_and_discovered_is_stored(engine: AsyncEngine) -> None:
    hb = HeartbeatEvent(**envelope(1), body=HeartbeatBody(uptime_s=5.0, outbox_depth=3, dropped=2))
    assert await apply(engine, hb) is ApplyOutcome.APPLIED
    async with engine.connect() as conn:
        agent = (await conn.execute(select(agents))).mappings().one()
    assert (agent["outbox_depth"], agent["dropped"], agent["status"]) == (3, 2, "online")
    found = DiscoveredEvent(**envelope(2), body=DiscoveredBody(source="static", address="127.0.0.1"))
    assert await apply(engine, found) is ApplyOutcome.APPLIED
    again = DiscoveredEvent(
        **envelope(3), body=DiscoveredBody(source="mdns", address="127.0.0.1", model="ULXD4", supported=True)
    )
    assert await apply(engine, again) is ApplyOutcome.APPLIED
    by_id = DiscoveredEvent(
        **envelope(4), body=DiscoveredBody(source="slp", address="10.0.0.9", port=45, device_id="EWDX-1")
    )
    assert await apply(engine, by_id) is ApplyOutcome.APPLIED
    async with engine.connect() as conn:
        rows = (await conn.execute(select(discovered).order_by(discovered.c.identity))).mappings().all()
    assert [(r["identity"], r["source"], r["model"], r["supported"]) for r in rows] == [
        ("127.0.0.1", "mdns", "ULXD4", True),
        ("EWDX-1", "slp", None, False),
    ]


async def _statuses(engine: AsyncEngine) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(devices.c.device_key, devices.c.status))).all()
        agent = (await conn.execute(select(agents.c.status))).scalar_one()
    return {"agent": agent, **{key: status for key, status in rows}}


async def test_silent_agent_goes_stale_not_offline_and_comes_back(engine: AsyncEngine) -> None:
    service = SynchronizationService()
    other = device().model_copy(update={"device_key": "dev-2"})
    for event in (
        HeartbeatEvent(**envelope(1), body=HeartbeatBody(uptime_s=1.0, interval_s=10.0)),
        DeviceEvent(**envelope(2), body=DeviceBody(device_key="dev-1", snapshot=device())),
        DeviceEvent(**envelope(3), body=DeviceBody(device_key="dev-2", snapshot=other)),
        OfflineEvent(**envelope(4), body=OfflineBody(device_key="dev-2")),
    ):
        assert await apply(engine, event) is ApplyOutcome.APPLIED
    now = time.time_ns() // 1_000_000
    async with engine.begin() as conn:
        # Three intervals (30 s) of silence are allowed; a moment more is not.
        assert await service.mark_stale_agents(conn, now + 29_000) == []
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online", "dev-2": "offline"}
    async with engine.begin() as conn:
        assert await service.mark_stale_agents(conn, now + 31_000) == ["pi-1"]
    assert await _statuses(engine) == {"agent": "stale", "dev-1": "stale", "dev-2": "stale"}
    async with engine.begin() as conn:
        assert await service.mark_stale_agents(conn, now + 60_000) == []
    # Any event brings the agent back and the devices to what it last reported.
    found = DiscoveredEvent(**envelope(5), body=DiscoveredBody(source="static", address="10.0.0.1"))
    assert await apply(engine, found) is ApplyOutcome.APPLIED
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online", "dev-2": "offline"}
    # A device event while stale is written with the reported status too.
    async with engine.begin() as conn:
        assert await service.mark_stale_agents(conn, now + 120_000) == ["pi-1"]
    back = DeviceEvent(**envelope(6), body=DeviceBody(device_key="dev-2", snapshot=other))
    assert await apply(engine, back) is ApplyOutcome.APPLIED
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online", "dev-2": "online"}


async def test_a_batch_applies_in_order_and_deduplicates_inside_itself(engine: AsyncEngine) -> None:
    snap = DeviceEvent(**envelope(1), body=DeviceBody(device_key="dev-1", snapshot=device()))
    delta = DeviceEvent(**envelope(2), body=DeviceBody(device_key="dev-1", changes={"name": "rack 1"}))
    offline = OfflineEvent(**envelope(3), body=OfflineBody(device_key="dev-1"))
    async with engine.begin() as conn:
        results = await SynchronizationService().apply_batch(conn, [snap, delta, delta, offline, snap])
    assert [r.outcome.value for r in results] == ["applied", "applied", "duplicate", "applied", "duplicate"]
    [row] = await stored(engine)
    assert (row["status"], row["device"]["name"]) == ("offline", "rack 1")


async def test_old_dedup_records_are_pruned_and_state_still_refuses_old_events(engine: AsyncEngine) -> None:
    snap = DeviceEvent(**envelope(5), body=DeviceBody(device_key="dev-1", snapshot=device("HH01 New")))
    assert await apply(engine, snap) is ApplyOutcome.APPLIED
    async with engine.begin() as conn:
        kept = await SynchronizationService().prune_applied(conn, older_than_ms=0)
        pruned = await SynchronizationService().prune_applied(
            conn, older_than_ms=time.time_ns() // 1_000_000 + 1
        )
    assert (kept, pruned) == (0, 1)
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(applied_events))).scalar_one() == 0
    # The dedup record is gone, but the device's state still refuses an older event.
    older = DeviceEvent(**envelope(4), body=DeviceBody(device_key="dev-1", snapshot=device("HH01 Old")))
    assert await apply(engine, older) is ApplyOutcome.OUTDATED
    [row] = await stored(engine)
    assert row["device"]["channels"][0]["name"] == "HH01 New"


async def test_channel_deltas_keep_the_descriptive_columns_and_device_deltas_move_them(
    engine: AsyncEngine,
) -> None:
    # The descriptive columns (model, name, site) follow a device-level delta and a new site, and
    # a channel delta leaves them as they were, also in batches that mix both kinds of device.
    sync = SynchronizationService()

    async def batch(*events: AnyEvent) -> None:
        async with engine.begin() as conn:
            changes = await sync.apply_batch_changes(conn, events)
        sync.committed(changes)
        assert {r.outcome for r in changes.results} == {ApplyOutcome.APPLIED}

    async def row(key: str) -> dict[str, Any]:
        async with engine.connect() as conn:
            found = await conn.execute(select(devices).where(devices.c.device_key == key))
            return dict(found.mappings().one())

    second = device().model_copy(update={"device_key": "dev-2"})
    await batch(
        DeviceEvent(**envelope(1), body=DeviceBody(device_key="dev-1", snapshot=device())),
        DeviceEvent(**envelope(2), body=DeviceBody(device_key="dev-2", snapshot=second)),
    )
    renamed = {"channels": {1: {"name": "HH01 Ines"}}}
    await batch(
        DeviceEvent(**envelope(3), body=DeviceBody(device_key="dev-1", changes=renamed)),
        DeviceEvent(
            **envelope(4), body=DeviceBody(device_key="dev-2", changes={"name": "Rack B", "model": "X"})
        ),
    )
    one, two = await row("dev-1"), await row("dev-2")
    assert (one["name"], one["model"], one["state"]["channels"][0]["name"]) == (None, "ULXD4", "HH01 Ines")
    assert (two["name"], two["model"], two["revision"]) == ("Rack B", "X", 1)
    moved = {**envelope(5), "site": "annex"}
    await batch(
        DeviceEvent(
            **moved, body=DeviceBody(device_key="dev-1", changes={"channels": {1: {"name": "HH01"}}})
        ),
        OfflineEvent(**envelope(6), body=OfflineBody(device_key="dev-2")),
    )
    one, two = await row("dev-1"), await row("dev-2")
    assert (one["site"], one["model"], one["revision"]) == ("annex", "ULXD4", 2)
    assert (two["site"], two["name"], two["status"], two["reported_status"]) == (
        "venue",
        "Rack B",
        "offline",
        "offline",
    )


async def test_devices_a_restarted_agent_no_longer_reports_go_offline_after_the_grace(
    engine: AsyncEngine,
) -> None:
    service = SynchronizationService()
    other = device().model_copy(update={"device_key": "dev-2"})
    for event in (
        HelloEvent(**envelope(1, ts=1_000), body=HelloBody(version="1")),
        DeviceEvent(**envelope(2, ts=1_001), body=DeviceBody(device_key="dev-1", snapshot=device())),
        DeviceEvent(**envelope(3, ts=1_002), body=DeviceBody(device_key="dev-2", snapshot=other)),
    ):
        assert await apply(engine, event) is ApplyOutcome.APPLIED
    now = time.time_ns() // 1_000_000
    async with engine.begin() as conn:
        # Both were reported since the agent's (only) start: nothing to do, however late.
        assert await service.mark_unreported(conn, now + 3_600_000, 300_000) == []
    # The agent restarts and reports dev-1 only (dev-2 was taken out of its configuration).
    assert await apply(engine, HelloEvent(**envelope(1, boot="b2", ts=5_000), body=HelloBody(version="1")))
    restarted = time.time_ns() // 1_000_000
    assert (
        await apply(
            engine,
            DeviceEvent(
                **envelope(2, boot="b2", ts=5_001), body=DeviceBody(device_key="dev-1", snapshot=device())
            ),
        )
        is ApplyOutcome.APPLIED
    )
    # A hello of the first boot applied late does not move the start back.
    assert (
        await apply(engine, HelloEvent(**envelope(9, ts=1_500), body=HelloBody(version="0")))
        is ApplyOutcome.APPLIED
    )
    async with engine.connect() as conn:
        started = (await conn.execute(select(agents.c.started_ms, agents.c.version))).one()
    assert tuple(started) == (5_000, "1")
    async with engine.begin() as conn:
        assert await service.mark_unreported(conn, restarted + 299_000, 300_000) == []
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online", "dev-2": "online"}
    async with engine.begin() as conn:
        # Past the window (a day after the start): no longer looked for.
        late = restarted + 300_000 + UNREPORTED_WINDOW_MS + 1_000
        assert await service.mark_unreported(conn, late, 300_000) == []
        marked = await service.mark_unreported(conn, restarted + 301_000, 300_000)
    assert [(d.site, d.agent, d.device_key) for d in marked] == [("venue", "pi-1", "dev-2")]
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online", "dev-2": "offline"}
    async with engine.begin() as conn:
        assert await service.mark_unreported(conn, restarted + 400_000, 300_000) == []
    # Reported again (plugged back in): online, and a service that kept the old state reads it again.
    back = DeviceEvent(
        **envelope(3, boot="b2", ts=5_100), body=DeviceBody(device_key="dev-2", snapshot=other)
    )
    async with engine.begin() as conn:
        assert (await service.apply(conn, back)).outcome is ApplyOutcome.APPLIED
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online", "dev-2": "online"}


async def test_an_agent_never_heard_starting_leaves_its_devices_alone(engine: AsyncEngine) -> None:
    # Heartbeats and snapshots only (its hello came before this database, or was lost to
    # retention): without a start to compare with, nothing is marked.
    for event in (
        HeartbeatEvent(**envelope(1), body=HeartbeatBody(uptime_s=1.0)),
        DeviceEvent(**envelope(2), body=DeviceBody(device_key="dev-1", snapshot=device())),
    ):
        assert await apply(engine, event) is ApplyOutcome.APPLIED
    async with engine.begin() as conn:
        assert (
            await SynchronizationService().mark_unreported(conn, time.time_ns() // 1_000_000 + 10**9, 1) == []
        )
    assert await _statuses(engine) == {"agent": "online", "dev-1": "online"}
