"""AlertService on SQLite and PostgreSQL: every rule, hysteresis, the lifecycle and its errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import (
    AlertNotFoundError,
    CollectorErrorCode,
    InvalidAlertRulesError,
    InvalidTransitionError,
)
from micboard.collector.live import LiveHub, Topic
from micboard.collector.services.alerts import (
    AlertChange,
    AlertRule,
    AlertService,
    AlertState,
    AlertThresholds,
    ChangeKind,
    DeviceTransition,
    Severity,
)
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.store.schema_alerts import alerts
from micboard.shared.envelope import DeviceBody, DeviceEvent, HeartbeatBody, HeartbeatEvent, MeterBody
from micboard.shared.model import ChannelMeter, Device, Family, ReceiverChannel, Transmitter, Vendor

T0 = 1_700_000_000_000
SITE, AGENT, KEY = "venue", "pi-1", "dev-1"


def device(bars: int | None = 5, percent: int | None = None, *, tx: bool = True) -> Device:
    transmitter = Transmitter(battery_bars=bars, battery_percent=percent) if tx else None
    return Device(
        device_key=KEY,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(ReceiverChannel(index=1, name="HH01 Fatai", transmitter=transmitter),),
    )


class Rig:
    """An AlertService and the last device state it saw, stepping a device through readings."""

    def __init__(self, engine: AsyncEngine, hub: LiveHub | None = None) -> None:
        self.service = AlertService(engine, hub=hub)
        self.engine = engine
        self.before: Device | None = None
        self.status = "online"

    async def state(self, after: Device, at_ms: int, status: str = "online") -> list[AlertChange]:
        change = DeviceTransition(
            SITE, AGENT, KEY, self.before, after, self.status if self.before else None, status
        )
        async with self.engine.begin() as conn:
            changes = await self.service.evaluate_device(conn, change, now_ms=at_ms)
        self.service.notify(changes)
        self.before, self.status = after, status
        return changes

    async def meter(
        self, at_ms: int, rf: float | None = -60.0, peak: float | None = -20.0
    ) -> list[AlertChange]:
        body = MeterBody(
            device_key=KEY, channels=(ChannelMeter(index=1, rf_dbm=(rf, None), audio_peak_dbfs=peak),)
        )
        return await self.service.evaluate_meter(SITE, AGENT, body, now_ms=at_ms)

    async def active(self) -> dict[str, Any]:
        found = await self.service.list_alerts(states=[AlertState.OPEN, AlertState.ACKNOWLEDGED])
        return {a.rule.value: a for a in found}


def kinds(changes: list[AlertChange]) -> list[tuple[str, str]]:
    return [(c.kind.value, c.alert.rule.value) for c in changes]


async def test_battery_low_then_critical_with_severity(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    assert await rig.state(device(bars=5), T0) == []
    assert kinds(await rig.state(device(bars=3), T0 + 1000)) == [("opened", "battery_low")]
    changes = await rig.state(device(bars=2), T0 + 2000)
    assert kinds(changes) == [("opened", "battery_critical")]
    active = await rig.active()
    assert active["battery_low"].severity is Severity.WARNING
    assert active["battery_critical"].severity is Severity.CRITICAL
    assert active["battery_critical"].channel == 1 and active["battery_critical"].value == 2.0
    assert "HH01 Fatai" in active["battery_critical"].message


async def test_battery_hysteresis_bars_and_hold(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(bars=3), T0)
    # Flapping 3 <-> 4 bars: the alert never resolves because 4 is not held for 30 s.
    for step in range(1, 11):
        assert await rig.state(device(bars=4 if step % 2 else 3), T0 + step * 5_000) == []
    assert (await rig.active())["battery_low"].state is AlertState.OPEN
    # 4 bars held: not resolved before the hold, resolved by the sweep after it.
    await rig.state(device(bars=4), T0 + 100_000)
    assert await rig.service.sweep(now_ms=T0 + 110_000) == []
    changes = await rig.service.sweep(now_ms=T0 + 130_000)
    assert kinds(changes) == [("resolved", "battery_low")]
    assert changes[0].alert.resolved_by == "system" and changes[0].alert.resolved_ms == T0 + 130_000


async def test_battery_percent_margin(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(bars=None, percent=40), T0)
    assert kinds(await rig.state(device(bars=None, percent=25), T0 + 1)) == [("opened", "battery_low")]
    # 26..29 % is inside the 5 % margin: neither clears nor reopens, even long after the hold.
    await rig.state(device(bars=None, percent=28), T0 + 2)
    assert await rig.service.sweep(now_ms=T0 + 600_000) == []
    await rig.state(device(bars=None, percent=31), T0 + 600_001)
    changes = await rig.state(device(bars=None, percent=32), T0 + 700_000)
    assert kinds(changes) == [("resolved", "battery_low")]


async def test_battery_unknown_keeps_alert_for_30_minutes(engine: AsyncEngine) -> None:
    sync = SynchronizationService()
    rig = Rig(engine)
    critical = device(bars=1)
    unknown = device(tx=False)
    base = {"site": SITE, "agent": AGENT, "boot": "b1"}
    async with engine.begin() as conn:
        await sync.apply(
            conn, DeviceEvent(**base, seq=1, ts=T0, body=DeviceBody(device_key=KEY, snapshot=critical))
        )
    await rig.state(critical, T0)
    async with engine.begin() as conn:
        await sync.apply(
            conn, DeviceEvent(**base, seq=2, ts=T0 + 1, body=DeviceBody(device_key=KEY, snapshot=unknown))
        )
    # The transmitter went away after an hour of steady 1 bar: "previously critical" starts now.
    assert await rig.state(unknown, T0 + 3_600_000) == []
    assert await rig.service.sweep(now_ms=T0 + 3_600_000 + 29 * 60_000) == []
    changes = await rig.service.sweep(now_ms=T0 + 3_600_000 + 30 * 60_000)
    assert sorted(kinds(changes)) == [("resolved", "battery_critical"), ("resolved", "battery_low")]


async def test_device_offline_opens_and_clears_at_once(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(), T0)
    assert kinds(await rig.state(device(), T0 + 1, status="offline")) == [("opened", "device_offline")]
    assert await rig.state(device(), T0 + 2, status="offline") == []
    assert kinds(await rig.state(device(), T0 + 3)) == [("resolved", "device_offline")]


async def test_rf_loss_needs_duration_and_margin(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(), T0)
    assert await rig.meter(T0, rf=-60) == []
    assert await rig.meter(T0 + 1000, rf=-95) == []
    assert await rig.meter(T0 + 2000, rf=None) == []  # no reading at all is no usable RF either
    changes = await rig.meter(T0 + 4000, rf=-99)
    assert kinds(changes) == [("opened", "rf_loss")]
    assert changes[0].alert.severity is Severity.CRITICAL
    # -89 dBm is usable but inside the 3 dB margin: nothing changes; -80 clears, held 30 s.
    assert await rig.meter(T0 + 5000, rf=-89) == []
    assert await rig.meter(T0 + 6000, rf=-80) == []
    assert await rig.meter(T0 + 20_000, rf=-80) == []
    assert await rig.meter(T0 + 21_000, rf=-95) == []  # bad again: the clear timer restarts
    assert await rig.meter(T0 + 40_000, rf=-80) == []
    assert kinds(await rig.meter(T0 + 71_000, rf=-80)) == [("resolved", "rf_loss")]


async def test_rf_loss_ignores_channel_without_transmitter(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(tx=False), T0)
    for step in range(10):
        assert await rig.meter(T0 + step * 1000, rf=None) == []


async def test_audio_clipping_with_hold(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(), T0)
    assert kinds(await rig.meter(T0, peak=-0.5)) == [("opened", "audio_clipping")]
    assert await rig.meter(T0 + 1000, peak=-2.0) == []  # inside the margin
    assert await rig.meter(T0 + 2000, peak=-12.0) == []  # clear starts
    assert await rig.meter(T0 + 5000, peak=0.0) == []  # clipping again: still one alert
    assert await rig.meter(T0 + 6000, peak=-12.0) == []
    assert kinds(await rig.service.sweep(now_ms=T0 + 16_000)) == [("resolved", "audio_clipping")]
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(alerts))).scalar() == 1


async def test_agent_stale_then_offline_then_back(engine: AsyncEngine) -> None:
    sync = SynchronizationService()
    service = AlertService(engine)
    hb = HeartbeatEvent(site=SITE, agent=AGENT, boot="b1", seq=1, ts=T0, body=HeartbeatBody(uptime_s=1.0))
    async with engine.begin() as conn:
        await sync.apply(conn, hb)
    async with engine.connect() as conn:
        from micboard.collector.store.schema import agents

        heard = (await conn.execute(select(agents.c.last_heartbeat_ms))).scalar_one()
    assert await service.sweep(now_ms=heard + 29_000) == []
    assert kinds(await service.sweep(now_ms=heard + 31_000)) == [("opened", "agent_stale")]
    assert kinds(await service.sweep(now_ms=heard + 301_000)) == [("opened", "agent_offline")]
    async with engine.begin() as conn:
        await sync.apply(conn, hb.model_copy(update={"seq": 2}))
    async with engine.connect() as conn:
        heard = (await conn.execute(select(agents.c.last_heartbeat_ms))).scalar_one()
    back = await service.sweep(now_ms=heard + 1000)
    assert sorted(kinds(back)) == [("resolved", "agent_offline"), ("resolved", "agent_stale")]
    assert back[0].alert.device_key is None


async def test_lifecycle_who_and_when_and_live(engine: AsyncEngine) -> None:
    hub = LiveHub()
    subscription = hub.subscribe(topics=frozenset({Topic.ALERT}))
    rig = Rig(engine, hub)
    await rig.state(device(bars=3), T0)
    alert_id = (await rig.active())["battery_low"].id
    acked = await rig.service.acknowledge(alert_id, "ada", now_ms=T0 + 10)
    assert acked.state is AlertState.ACKNOWLEDGED
    assert (acked.acknowledged_by, acked.acknowledged_ms) == ("ada", T0 + 10)
    with pytest.raises(InvalidTransitionError) as info:
        await rig.service.acknowledge(alert_id, "bob")
    assert info.value.code == CollectorErrorCode.ALERT_INVALID_TRANSITION
    resolved = await rig.service.resolve(alert_id, "bob", now_ms=T0 + 20)
    assert (resolved.state, resolved.resolved_by, resolved.resolved_ms) == (
        AlertState.RESOLVED,
        "bob",
        T0 + 20,
    )
    assert resolved.acknowledged_by == "ada"
    for action in (rig.service.acknowledge, rig.service.resolve):
        with pytest.raises(InvalidTransitionError):
            await action(alert_id, "carol")
    with pytest.raises(AlertNotFoundError) as missing:
        await rig.service.resolve(999_999, "carol")
    assert missing.value.code == CollectorErrorCode.ALERT_NOT_FOUND
    assert (await rig.service.get(alert_id)).state is AlertState.RESOLVED
    seen = [(await subscription.get()) for _ in range(3)]
    assert [m.data["change"] for m in seen if m is not None] == ["opened", "acknowledged", "resolved"]
    # The battery still reads 3 bars: the next evaluation opens a fresh alert.
    assert kinds(await rig.state(device(bars=2), T0 + 30)) == [
        ("opened", "battery_low"),
        ("opened", "battery_critical"),
    ]


async def test_acknowledged_alert_resolves_when_condition_clears(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    await rig.state(device(), T0, status="offline")
    alert = (await rig.active())["device_offline"]
    await rig.service.acknowledge(alert.id, "ada", now_ms=T0 + 1)
    [change] = await rig.state(device(), T0 + 2)
    assert change.kind is ChangeKind.RESOLVED and change.alert.acknowledged_by == "ada"


async def test_site_thresholds_override_and_validation(engine: AsyncEngine) -> None:
    rig = Rig(engine)
    thresholds = await rig.service.set_site_thresholds(SITE, {"battery_replace_bars": 4}, by="ada")
    assert thresholds.battery_replace_bars == 4 and thresholds.battery_critical_bars == 2
    assert kinds(await rig.state(device(bars=4), T0)) == [("opened", "battery_low")]
    with pytest.raises(InvalidAlertRulesError):
        await rig.service.set_site_thresholds(SITE, {"battery_critical_bars": 5})
    with pytest.raises(InvalidAlertRulesError):
        await rig.service.set_site_thresholds(SITE, {"no_such": 1})
    fresh = AlertService(engine)
    async with engine.connect() as conn:
        assert (await fresh.thresholds_for(conn, SITE)).battery_replace_bars == 4
        assert await fresh.thresholds_for(conn, "other") == AlertThresholds()


async def test_changes_to_one_sites_thresholds_at_once_all_take(engine: AsyncEngine) -> None:
    """Two admins (or an admin and the CLI, or two collector processes) change different values."""
    first, second, third = AlertService(engine), AlertService(engine), AlertService(engine)
    await asyncio.gather(
        first.change_site_thresholds(SITE, {"battery_replace_bars": 4}, by="ada"),
        second.change_site_thresholds(SITE, {"clip_dbfs": -0.5}, by="bob"),
        third.change_site_thresholds(SITE, {"battery_critical_percent": 15}, by="cy"),
    )
    overrides, in_force = await first.site_thresholds(SITE)
    assert overrides == {"battery_replace_bars": 4, "clip_dbfs": -0.5, "battery_critical_percent": 15}
    assert in_force.battery_critical_percent == 15
    # A refused change stores nothing, and the others stay.
    with pytest.raises(InvalidAlertRulesError):
        await second.change_site_thresholds(SITE, {"battery_critical_bars": 5})
    assert (await first.site_thresholds(SITE))[0] == overrides
    # On a site with no overrides yet, two first changes at once: neither is lost.
    await asyncio.gather(
        first.change_site_thresholds("other", {"battery_replace_bars": 4}),
        second.change_site_thresholds("other", {"clip_dbfs": -0.5}),
    )
    assert (await third.site_thresholds("other"))[0] == {"battery_replace_bars": 4, "clip_dbfs": -0.5}
    # Dropping the last override removes the row; dropping one that is not there changes nothing.
    await first.change_site_thresholds("other", {}, reset=["battery_replace_bars", "clip_dbfs"])
    await first.change_site_thresholds("none", {}, reset=["clip_dbfs"])
    assert set(await first.site_overrides()) == {SITE}


async def test_two_services_never_open_the_same_alert_twice(engine: AsyncEngine) -> None:
    first, second = Rig(engine), Rig(engine)
    await first.state(device(), T0)
    await second.state(device(), T0)
    assert kinds(await first.meter(T0, peak=0.0)) == [("opened", "audio_clipping")]
    assert await second.meter(T0 + 1, peak=0.0) == []
    rows = await first.service.list_alerts(states=[AlertState.OPEN])
    assert [a.rule for a in rows] == [AlertRule.AUDIO_CLIPPING]


async def test_alerts_of_channels_a_receiver_no_longer_has_are_resolved(engine: AsyncEngine) -> None:
    def receiver(*bars: int) -> Device:
        return Device(
            device_key=KEY,
            vendor=Vendor.SHURE,
            family=Family.ULXD,
            channels=tuple(
                ReceiverChannel(index=i, transmitter=Transmitter(battery_bars=b))
                for i, b in enumerate(bars, 1)
            ),
        )

    rig = Rig(engine)
    await rig.state(receiver(5, 5), T0)
    opened = await rig.state(receiver(3, 1), T0 + 1000)
    assert sorted(kinds(opened)) == [
        ("opened", "battery_critical"),
        ("opened", "battery_low"),
        ("opened", "battery_low"),
    ]
    body = MeterBody(
        device_key=KEY, channels=(ChannelMeter(index=2, rf_dbm=(None, None), audio_peak_dbfs=0.0),)
    )
    for at in (T0 + 1000, T0 + 5000):
        await rig.service.evaluate_meter(SITE, AGENT, body, now_ms=at)
    found = await rig.service.list_alerts(states=[AlertState.OPEN])
    assert sorted((a.channel, a.rule.value) for a in found) == [
        (1, "battery_low"),
        (2, "audio_clipping"),
        (2, "battery_critical"),
        (2, "battery_low"),
        (2, "rf_loss"),
    ]
    # Reconfigured to one channel: nothing will ever clear channel 2's alerts, so they resolve now.
    changes = await rig.state(receiver(3), T0 + 6000)
    assert sorted((c.kind.value, c.alert.channel, c.alert.rule.value) for c in changes) == [
        ("resolved", 2, "audio_clipping"),
        ("resolved", 2, "battery_critical"),
        ("resolved", 2, "battery_low"),
        ("resolved", 2, "rf_loss"),
    ]
    assert all(c.alert.resolved_by == "system" for c in changes)
    found = await rig.service.list_alerts(states=[AlertState.OPEN])
    assert [(a.channel, a.rule.value) for a in found] == [(1, "battery_low")]
    # Resolved for good: the sweep has nothing of channel 2 left to hold or resolve.
    assert await rig.service.sweep(now_ms=T0 + 60_000) == []
