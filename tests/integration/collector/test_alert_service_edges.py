"""AlertService edges on SQLite and PostgreSQL: stored thresholds, the write filter, meter races, holds."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import AlertNotFoundError, InvalidAlertRulesError
from micboard.collector.services.alerts import (
    THRESHOLDS_REFRESH_S,
    Alert,
    AlertChange,
    AlertRule,
    AlertService,
    AlertState,
    AlertThresholds,
    DeviceTransition,
)
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.store.schema_alerts import alert_rules
from micboard.shared.envelope import DeviceBody, DeviceEvent, MeterBody, OfflineBody, OfflineEvent
from micboard.shared.model import ChannelMeter, Device, Family, ReceiverChannel, Transmitter, Vendor

T0 = 1_700_000_000_000
SITE, AGENT, KEY = "venue", "pi-1", "dev-1"


def device(*bars: int | None, key: str = KEY) -> Device:
    """A receiver with one channel per entry of ``bars`` (a transmitter reporting those bars)."""
    return Device(
        device_key=key,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=tuple(
            ReceiverChannel(index=i, name=f"HH{i:02d}", transmitter=Transmitter(battery_bars=b))
            for i, b in enumerate(bars, start=1)
        ),
    )


def clip_meter(peak: float | None, key: str = KEY) -> MeterBody:
    return MeterBody(device_key=key, channels=(ChannelMeter(index=1, rf_dbm=(-60.0,), audio_peak_dbfs=peak),))


def kinds(changes: list[AlertChange]) -> list[tuple[str, str]]:
    return sorted((c.kind.value, c.alert.rule.value) for c in changes)


async def transition(
    service: AlertService,
    engine: AsyncEngine,
    before: Device | None,
    after: Device | None,
    status_before: str | None,
    status_after: str,
    at_ms: int,
    key: str = KEY,
) -> list[AlertChange]:
    change = DeviceTransition(SITE, AGENT, key, before, after, status_before, status_after)
    async with engine.begin() as conn:
        return await service.evaluate_device(conn, change, now_ms=at_ms)


def reporting(percent: int) -> Device:
    """A receiver whose one transmitter reports ``percent`` (and no bars)."""
    return Device(
        device_key=KEY,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(ReceiverChannel(index=1, name="HH01", transmitter=Transmitter(battery_percent=percent)),),
    )


async def store(engine: AsyncEngine, seq: int, ts: int, body: DeviceBody | OfflineBody) -> None:
    """Apply one event of the test's agent through the synchronization, as ingest does."""
    where: dict[str, Any] = {"site": SITE, "agent": AGENT, "boot": "b1", "seq": seq, "ts": ts}
    event = (
        DeviceEvent(**where, body=body) if isinstance(body, DeviceBody) else OfflineEvent(**where, body=body)
    )
    async with engine.begin() as conn:
        await SynchronizationService().apply(conn, event)


async def low_battery_alert(engine: AsyncEngine) -> tuple[AlertService, Device, Alert]:
    """A receiver stored online at T0 with its transmitter at 20 %, and the battery_low alert it opened."""
    low = reporting(20)
    service = AlertService(engine)
    await store(engine, 1, T0, DeviceBody(device_key=KEY, snapshot=low))
    opened = await transition(service, engine, None, low, None, "online", T0)
    [battery] = [c.alert for c in opened if c.alert.rule is AlertRule.BATTERY_LOW]
    return service, low, battery


async def test_thresholds_are_validated_and_replaced_per_site(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    with pytest.raises(InvalidAlertRulesError, match="battery_critical_percent must not exceed"):
        await service.set_site_thresholds(SITE, {"battery_critical_percent": 40})
    # A value out of range: the message names the threshold.
    with pytest.raises(
        InvalidAlertRulesError, match=r"'venue': rf_min_dbm: Input should be less than or equal to 0"
    ):
        await service.set_site_thresholds(SITE, {"rf_min_dbm": 20})
    await service.set_site_thresholds(SITE, {"rf_min_dbm": -80.0}, by="ada")
    replaced = await service.set_site_thresholds(SITE, {"rf_min_dbm": -85.0}, by="grace")
    assert replaced.rf_min_dbm == -85.0
    fresh = AlertService(engine)
    async with engine.connect() as conn:
        assert (await fresh.thresholds_for(conn, SITE)).rf_min_dbm == -85.0


async def test_thresholds_changed_by_another_process_reach_the_alert_rules_within_the_refresh(
    engine: AsyncEngine,
) -> None:
    assert AlertService(engine).rules_cache_s == THRESHOLDS_REFRESH_S == 5.0  # what the docs promise
    # A short refresh, so that the test can wait it out; no hold, so that a clear resolves at once.
    ingesting = AlertService(engine, rules_cache_s=0.5, defaults=AlertThresholds(resolve_hold_s=0))
    serving = AlertService(engine)  # the process (or the CLI) that takes the change
    # Bars 3 open "replace" under the defaults; the site lowers that threshold to 1 bar.
    assert kinds(await transition(ingesting, engine, None, device(3), None, "online", T0)) == [
        ("opened", "battery_low")
    ]
    await serving.change_site_thresholds(SITE, {"battery_replace_bars": 1, "battery_critical_bars": 0})
    # Inside the refresh the ingesting process still works with what it read: a new reading of
    # 3 bars (the transition says the battery changed, so it is evaluated) stays "replace".
    assert await transition(ingesting, engine, device(5), device(3), "online", "online", T0 + 1) == []
    await asyncio.sleep(0.6)
    async with engine.connect() as conn:
        assert (await ingesting.thresholds_for(conn, SITE)).battery_replace_bars == 1
    # Past it, 3 bars are good at this site: the alert resolves.
    assert kinds(await transition(ingesting, engine, device(5), device(3), "online", "online", T0 + 2)) == [
        ("resolved", "battery_low")
    ]


async def test_an_invalid_stored_row_falls_back_to_the_defaults(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    # A row edited by hand, bypassing validation.
    async with engine.begin() as conn:
        await conn.execute(
            insert(alert_rules).values(site=SITE, thresholds={"battery_replace_bars": 9}, updated_ms=T0)
        )
    defaults = AlertThresholds(resolve_hold_s=5.0)
    service = AlertService(engine, defaults=defaults)
    with caplog.at_level(logging.ERROR, logger="micboard.collector.services.alerts"):
        async with engine.connect() as conn:
            assert await service.thresholds_for(conn, SITE) is defaults
    [record] = [r for r in caplog.records if r.getMessage().startswith("invalid stored alert thresholds")]
    assert record.__dict__["site"] == SITE
    # Alerts still work at that site, with the defaults.
    changes = await transition(service, engine, None, device(3), None, "online", T0)
    assert kinds(changes) == [("opened", "battery_low")]


async def test_needs_evaluation_skips_writes_that_change_no_outcome(engine: AsyncEngine) -> None:
    service = AlertService(engine)

    def state(*txs: dict[str, Any] | None) -> dict[str, Any]:
        return {"channels": [{"index": i, "transmitter": tx} for i, tx in enumerate(txs, start=1)]}

    clear, breached = {"battery_bars": 5}, {"battery_bars": 3}
    before = state(clear, breached)
    # Unknown site, new device, changed status: always evaluate.
    assert service.needs_evaluation(SITE, before, state(clear, breached), "online", "online")
    async with engine.connect() as conn:
        await service.thresholds_for(conn, SITE)
    assert service.needs_evaluation(SITE, None, before, None, "online")
    assert service.needs_evaluation(SITE, before, before, "online", "offline")
    # The same objects, or readings whose every rule outcome is unchanged: nothing to do.
    assert not service.needs_evaluation(SITE, before, before, "online", "online")
    shared = before["channels"][0]
    same_tx = {"index": 2, "transmitter": before["channels"][1]["transmitter"]}
    assert not service.needs_evaluation(SITE, before, {"channels": [shared, same_tx]}, "online", "online")
    assert not service.needs_evaluation(
        SITE, before, state({"battery_bars": 4}, {"battery_bars": 3}), "online", "online"
    )
    assert not service.needs_evaluation(
        SITE, state({}, breached), state({"battery_percent": None}, breached), "online", "online"
    )
    # A breached reading whose value changed, a transmitter that came or went, a new layout: evaluate.
    for after in (
        state(clear, {"battery_bars": 2}),
        state(clear, {"battery_bars": 3, "battery_percent": 20}),
        state(None, breached),
        state(clear),
        {"channels": [{"index": 5, "transmitter": clear}, {"index": 2, "transmitter": breached}]},
    ):
        assert service.needs_evaluation(SITE, before, after, "online", "online"), after
    assert service.needs_evaluation(SITE, state(None, breached), before, "online", "online")


async def test_device_rules_on_removal_unchanged_channels_and_held_clears(engine: AsyncEngine) -> None:
    service = AlertService(engine, defaults=AlertThresholds(resolve_hold_s=30.0))
    low = device(3, 5)
    assert kinds(await transition(service, engine, None, low, None, "online", T0)) == [
        ("opened", "battery_low")
    ]
    # Only channel 2 changed: channel 1 is skipped, nothing opens or clears.
    assert await transition(service, engine, low, device(3, 4), "online", "online", T0 + 1000) == []
    # Back online after an outage with the same reading: the open alert simply stays.
    assert kinds(await transition(service, engine, low, None, "online", "offline", T0 + 2000)) == [
        ("opened", "device_offline")
    ]
    assert kinds(await transition(service, engine, None, low, "offline", "online", T0 + 3000)) == [
        ("resolved", "device_offline")
    ]
    [alert] = await service.list_alerts(states=[AlertState.OPEN])
    assert alert.rule is AlertRule.BATTERY_LOW and alert.value == 3.0 and alert.updated_ms == T0
    # Clear readings start the hold; a further clear reading inside the hold changes nothing.
    assert await transition(service, engine, low, device(5, 5), "online", "online", T0 + 10_000) == []
    assert (
        await transition(service, engine, device(5, 5), device(4, 5), "online", "online", T0 + 20_000) == []
    )
    assert await service.sweep(now_ms=T0 + 20_000) == []
    assert (await service.get(alert.id)).state is AlertState.OPEN
    changes = await transition(service, engine, device(4, 5), device(5, 5), "online", "online", T0 + 41_000)
    assert kinds(changes) == [("resolved", "battery_low")]


async def test_agent_stale_and_back_through_agents_changed(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    async with engine.begin() as conn:
        assert await service.agents_changed(conn) == []
        opened = await service.agents_changed(conn, stale=[(SITE, AGENT)], now_ms=T0)
        # Stale again, and "back" for an agent that never went stale: no change.
        assert (
            await service.agents_changed(conn, stale=[(SITE, AGENT)], back=[(SITE, "pi-2")], now_ms=T0 + 1)
            == []
        )
    assert kinds(opened) == [("opened", "agent_stale")]
    assert opened[0].alert.device_key is None and opened[0].alert.message == f"agent {AGENT}: no heartbeat"
    async with engine.begin() as conn:
        back = await service.agents_changed(conn, back=[(SITE, AGENT)], now_ms=T0 + 2)
    assert kinds(back) == [("resolved", "agent_stale")] and back[0].alert.resolved_by == "system"


async def test_a_site_waiting_longer_for_stale_agents_gets_one_alert_not_three(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    await service.change_site_thresholds(SITE, {"agent_stale_intervals": 10})
    async with engine.begin() as conn:
        # The store marks the agent stale after 3 intervals: the site asked for 10, so no alert
        # yet (it would be resolved by the next sweep as "not stale yet" and opened again).
        assert await service.agents_changed(conn, stale=[(SITE, AGENT)], now_ms=T0) == []
        # Another site on the defaults gets its alert with the store's stale mark.
        opened = await service.agents_changed(conn, stale=[("hall", "pi-9")], now_ms=T0)
    assert kinds(opened) == [("opened", "agent_stale")] and opened[0].alert.site == "hall"
    assert [a.site for a in await service.list_alerts()] == ["hall"]


async def test_moved_battery_thresholds_are_judged_on_the_stored_readings(engine: AsyncEngine) -> None:
    # A transmitter reporting 35 %, which stays put (a bars-only receiver may not move for hours).
    await store(engine, 1, T0, DeviceBody(device_key=KEY, snapshot=reporting(35)))
    service = AlertService(engine, rules_cache_s=0)
    assert await service.sweep(now_ms=T0) == []  # 35 % is clear of the default 25 % (and its margin)
    # The dashboard's process (or the CLI) raises "replace" to 40 %: the tile says "replace"
    # within seconds, and so does an alert, at the next sweep of the ingesting collector.
    await AlertService(engine).change_site_thresholds(SITE, {"battery_replace_percent": 40}, by="ada")
    assert kinds(await service.sweep(now_ms=T0 + 1_000)) == [("opened", "battery_low")]
    assert await service.sweep(now_ms=T0 + 2_000) == []  # judged once, not on every sweep
    # Back to the default: clear, and resolved once the hold is over, as for a reading.
    await service.change_site_thresholds(SITE, {}, reset=["battery_replace_percent"])
    assert await service.sweep(now_ms=T0 + 3_000) == []
    resolved = await service.sweep(now_ms=T0 + 3_000 + 3_600_000)
    assert kinds(resolved) == [("resolved", "battery_low")] and resolved[0].alert.resolved_by == "system"


async def test_an_alert_resolved_by_hand_while_its_condition_holds_opens_again_at_the_sweep(
    engine: AsyncEngine,
) -> None:
    service, low, battery = await low_battery_alert(engine)
    # Resolved by hand; the battery still reads 20 % and will not report again for a while.
    await service.resolve(battery.id, "ada", now_ms=T0 + 1_000)
    again = await service.sweep(now_ms=T0 + 2_000)
    assert kinds(again) == [("opened", "battery_low")] and again[0].alert.id != battery.id
    assert await service.sweep(now_ms=T0 + 3_000) == []
    # The receiver goes offline and stays so: its alert resolved by hand comes back too.
    await store(engine, 2, T0 + 4_000, OfflineBody(device_key=KEY))
    [offline] = [
        c.alert
        for c in await transition(service, engine, low, low, "online", "offline", T0 + 4_000)
        if c.alert.rule is AlertRule.DEVICE_OFFLINE
    ]
    await service.resolve(offline.id, "ada", now_ms=T0 + 5_000)
    assert kinds(await service.sweep(now_ms=T0 + 6_000)) == [("opened", "device_offline")]


async def test_a_receiver_gone_offline_lets_its_battery_alerts_age_out_as_unknown(
    engine: AsyncEngine,
) -> None:
    service, low, _battery = await low_battery_alert(engine)
    # Packed away after the show: the receiver goes offline an hour after its last reading.
    gone_at = T0 + 3_600_000
    await store(engine, 2, gone_at, OfflineBody(device_key=KEY))
    await transition(service, engine, low, low, "online", "offline", gone_at)
    # "Previously low" for battery_unknown_keep_s (30 min) from when it went offline, not from
    # its last reading an hour before; then the battery is no longer known and the alert goes.
    assert await service.sweep(now_ms=gone_at + 1_000) == []
    aged = await service.sweep(now_ms=gone_at + 1_800_000 + 1)
    assert kinds(aged) == [("resolved", "battery_low")] and aged[0].alert.resolved_by == "system"
    # The receiver's own offline alert stays: it is still offline.
    assert [a.rule for a in await service.list_alerts(states=[AlertState.OPEN])] == [AlertRule.DEVICE_OFFLINE]


async def test_meter_races_between_two_collectors_and_manual_resolution(engine: AsyncEngine) -> None:
    # No threshold cache: every meter goes through the store, as just after a restart.
    first = AlertService(engine, rules_cache_s=0)
    second = AlertService(engine, rules_cache_s=0)
    # A device the services never saw (no transmitter known, no audio): nothing at all.
    assert await second.evaluate_meter(SITE, AGENT, clip_meter(None), now_ms=T0) == []
    assert await second.evaluate_meter(SITE, AGENT, clip_meter(-2.5), now_ms=T0) == []  # inside the margin
    assert kinds(await first.evaluate_meter(SITE, AGENT, clip_meter(0.0), now_ms=T0 + 1)) == [
        ("opened", "audio_clipping")
    ]
    # The second collector did not know the alert: its insert is a no-op and it learns the alert.
    assert await second.evaluate_meter(SITE, AGENT, clip_meter(0.0), now_ms=T0 + 2) == []
    [alert] = await first.list_alerts(states=[AlertState.OPEN])
    # Clear on the second: the hold starts; clear again inside the hold: still open.
    assert await second.evaluate_meter(SITE, AGENT, clip_meter(-30.0), now_ms=T0 + 3) == []
    assert await second.evaluate_meter(SITE, AGENT, clip_meter(-30.0), now_ms=T0 + 5_000) == []
    assert (await second.get(alert.id)).state is AlertState.OPEN
    # Resolved by hand while still clipping: the next clipping meter opens a new alert.
    resolved = await first.resolve(alert.id, "ada", now_ms=T0 + 6_000)
    assert resolved.resolved_by == "ada" and resolved.state is AlertState.RESOLVED
    reopened = await first.evaluate_meter(SITE, AGENT, clip_meter(0.0), now_ms=T0 + 7_000)
    assert kinds(reopened) == [("opened", "audio_clipping")] and reopened[0].alert.id != alert.id


async def test_lifecycle_refusals_and_list_filters(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    await transition(service, engine, None, device(1), None, "online", T0)
    await transition(service, engine, None, device(3, key="dev-2"), None, "online", T0 + 1, key="dev-2")
    async with engine.begin() as conn:
        await service.agents_changed(conn, stale=[("hall", "pi-9")], now_ms=T0 + 2)
    for missing in (
        service.get(987_654),
        service.acknowledge(987_654, "ada"),
        service.resolve(987_654, "ada"),
    ):
        with pytest.raises(AlertNotFoundError):
            await missing
    alerts = await service.list_alerts()
    assert len(alerts) == 4 and alerts[0].rule is AlertRule.AGENT_STALE  # newest first
    with pytest.raises(ValueError, match="acknowledges"):
        await service.acknowledge(alerts[0].id, "")
    with pytest.raises(ValueError, match="resolves"):
        await service.resolve(alerts[0].id, "")
    assert [a.agent for a in await service.list_alerts(site="hall")] == ["pi-9"]
    assert {a.device_key for a in await service.list_alerts(agent=AGENT)} == {KEY, "dev-2"}
    assert await service.list_alerts(site=SITE, agent="pi-9") == []
    assert len(await service.list_alerts(site=SITE, agent=AGENT, limit=2)) == 2


async def test_a_battery_the_store_still_knows_is_not_aged_out(engine: AsyncEngine) -> None:
    sync = SynchronizationService()
    service = AlertService(engine)
    base = {"site": SITE, "agent": AGENT, "boot": "b1"}
    low = device(3)
    async with engine.begin() as conn:
        await sync.apply(
            conn, DeviceEvent(**base, seq=1, ts=T0, body=DeviceBody(device_key=KEY, snapshot=low))
        )
    assert kinds(await transition(service, engine, None, low, None, "online", T0)) == [
        ("opened", "battery_low")
    ]
    # Long after the unknown-battery keep time, the stored reading is still valid: the alert stays.
    assert await service.sweep(now_ms=T0 + 24 * 3_600_000) == []
    # The transmitter stops reporting its battery: "previously low" starts at this reading.
    silent = device(None)
    async with engine.begin() as conn:
        await sync.apply(
            conn, DeviceEvent(**base, seq=2, ts=T0 + 1, body=DeviceBody(device_key=KEY, snapshot=silent))
        )
    later = T0 + 25 * 3_600_000
    assert await transition(service, engine, low, silent, "online", "online", later) == []
    [alert] = await service.list_alerts(states=[AlertState.OPEN])
    assert alert.observed_ms == later and alert.value == 3.0
    assert await service.sweep(now_ms=later + 29 * 60_000) == []
    changes = await service.sweep(now_ms=later + 30 * 60_000)
    assert kinds(changes) == [("resolved", "battery_low")]
