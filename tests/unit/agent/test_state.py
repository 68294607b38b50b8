"""Change detection: snapshots, deltas of only the changed fields, snapshot cadence, meter throttling."""

from __future__ import annotations

import asyncio

import pytest

from micboard.agent.state import DeviceState, StateTracker
from micboard.shared.envelope import DeviceBody, MeterBody, OfflineBody, OfflineReason
from micboard.shared.model import ChannelMeter, Device, Family, ReceiverChannel, Transmitter, Vendor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def device(*, bars: int = 4, name: str = "HH01 Ana", firmware: str = "2.7.6") -> Device:
    return Device(
        device_key="shure-ulxd-1",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4D",
        firmware=firmware,
        channels=(
            ReceiverChannel(
                index=1, name=name, transmitter=Transmitter(battery_bars=bars, battery_percent=80)
            ),
            ReceiverChannel(index=2, name="BP02 Ben"),
        ),
    )


def latest(out: list[DeviceBody | OfflineBody]) -> DeviceBody | OfflineBody:
    # A function call, so that type narrowing of one element does not stick to the next one.
    return out[-1]


def meter(index: int, audio: float) -> ChannelMeter:
    return ChannelMeter(index=index, audio_dbfs=audio, rf_dbm=(-60.0, -70.0))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def out() -> list[DeviceBody | OfflineBody]:
    return []


@pytest.fixture
def meters() -> list[MeterBody]:
    return []


@pytest.fixture
def tracker(clock: Clock, out: list[DeviceBody | OfflineBody], meters: list[MeterBody]) -> StateTracker:
    return StateTracker(out.append, meters.append, snapshot_interval_s=60.0, meter_rate_hz=4.0, clock=clock)


def test_first_update_is_a_snapshot_then_deltas_carry_only_changed_fields(
    tracker: StateTracker, out: list[DeviceBody | OfflineBody]
) -> None:
    tracker.track("shure-ulxd-1")
    assert tracker.state("shure-ulxd-1") is DeviceState.CONNECTING
    tracker.device_updated(device())
    assert len(out) == 1 and isinstance(out[0], DeviceBody) and out[0].snapshot == device()
    assert tracker.state("shure-ulxd-1") is DeviceState.ONLINE

    tracker.device_updated(device())  # nothing changed: nothing sent
    assert len(out) == 1 and tracker.stats.unchanged == 1

    tracker.device_updated(device(bars=1))
    delta = out[-1]
    assert isinstance(delta, DeviceBody) and delta.changes is not None
    assert list(delta.changes) == ["channels"]
    assert list(delta.changes["channels"]) == [1]
    assert list(delta.changes["channels"][1]) == ["transmitter"]
    assert delta.changes["channels"][1]["transmitter"]["battery_bars"] == 1

    tracker.device_updated(device(bars=1, firmware="2.7.7"))
    firmware = latest(out)
    assert isinstance(firmware, DeviceBody) and firmware.changes == {"firmware": "2.7.7"}
    assert (tracker.stats.snapshots, tracker.stats.deltas) == (1, 2)


def test_full_snapshot_every_interval_while_online(
    tracker: StateTracker, clock: Clock, out: list[DeviceBody | OfflineBody]
) -> None:
    tracker.device_updated(device())
    clock.now += 59.0
    assert tracker.emit_due_snapshots() == 0
    clock.now += 1.0
    assert tracker.emit_due_snapshots() == 1
    assert isinstance(out[-1], DeviceBody) and out[-1].is_snapshot
    clock.now += 30.0
    tracker.device_updated(device(name="HH01 Ida"))  # a delta does not reset the cadence
    assert out[-1].changes is not None
    clock.now += 30.0
    assert tracker.emit_due_snapshots() == 1
    assert out[-1].snapshot == device(name="HH01 Ida")


def test_offline_at_once_then_snapshot_when_back(
    tracker: StateTracker, out: list[DeviceBody | OfflineBody]
) -> None:
    tracker.device_updated(device())
    tracker.link_changed("shure-ulxd-1", False, "silent")
    offline = out[-1]
    assert isinstance(offline, OfflineBody) and offline.reason is OfflineReason.SILENT
    assert offline.last_seen_ts is not None
    tracker.link_changed("shure-ulxd-1", False, "silent")  # reported once
    assert sum(isinstance(b, OfflineBody) for b in out) == 1
    assert tracker.devices_by_state() == {"connecting": 0, "online": 0, "offline": 1}
    assert tracker.emit_due_snapshots() == 0  # no cadence snapshot of an offline device

    # Shure drivers report the full read before the link: either order gives one snapshot.
    tracker.device_updated(device())
    tracker.link_changed("shure-ulxd-1", True, "connected")
    assert isinstance(out[-1], DeviceBody) and out[-1].is_snapshot
    assert tracker.stats.snapshots == 2

    tracker.link_changed("shure-ulxd-1", False, "driver_crashed")
    last = latest(out)
    assert isinstance(last, OfflineBody) and last.detail == "driver_crashed"
    tracker.link_changed("shure-ulxd-1", True, "answering")  # SSC order: link first
    tracker.device_updated(device())
    back = latest(out)
    assert isinstance(back, DeviceBody) and back.is_snapshot


def test_first_failure_to_connect_is_offline_too(
    tracker: StateTracker, out: list[DeviceBody | OfflineBody]
) -> None:
    tracker.track("ssc-1")
    tracker.link_changed("ssc-1", False, "connect_failed")
    assert isinstance(out[0], OfflineBody) and out[0].reason is OfflineReason.CONNECT_FAILED
    assert out[0].last_seen_ts is None and out[0].detail is None


def test_a_known_reason_with_what_the_driver_saw_keeps_both(
    tracker: StateTracker, out: list[DeviceBody | OfflineBody]
) -> None:
    tracker.track("slxd-1")
    tracker.link_changed("slxd-1", False, "connect_failed: refuses control; allow it" + "!" * 200)
    [offline] = out
    assert isinstance(offline, OfflineBody) and offline.reason is OfflineReason.CONNECT_FAILED
    assert offline.detail is not None and offline.detail.startswith("refuses control; allow it")
    assert len(offline.detail) == 128  # bounded, whatever the driver said


def test_restarted_driver_sends_a_snapshot(
    tracker: StateTracker, out: list[DeviceBody | OfflineBody]
) -> None:
    tracker.device_updated(device())
    tracker.track("shure-ulxd-1")
    tracker.device_updated(device())
    assert [b.is_snapshot for b in out if isinstance(b, DeviceBody)] == [True, True]
    tracker.forget("shure-ulxd-1")
    assert tracker.state("shure-ulxd-1") is None and tracker.device("shure-ulxd-1") is None


def test_meters_throttled_per_channel_latest_wins(
    tracker: StateTracker, clock: Clock, meters: list[MeterBody]
) -> None:
    tracker.track("shure-ulxd-1")
    tracker.meters_updated("shure-ulxd-1", [meter(1, -40.0), meter(2, -30.0)])
    assert len(meters) == 1 and [m.index for m in meters[0].channels] == [1, 2]
    # Ten updates within the 250 ms interval: nothing goes out, only the last one is kept.
    for step in range(10):
        clock.now += 0.02
        tracker.meters_updated("shure-ulxd-1", [meter(1, -40.0 + step)])
    assert len(meters) == 1
    clock.now += 0.06  # over 250 ms since channel 1 was sent
    tracker.flush_meters()
    assert len(meters) == 2
    assert meters[1].channels == (meter(1, -31.0),)
    assert tracker.stats.meters_superseded == 9
    # Channel 2 has its own clock: it goes out at once.
    tracker.meters_updated("shure-ulxd-1", [meter(2, -20.0)])
    assert meters[-1].channels == (meter(2, -20.0),)
    # Unknown devices and offline devices send no meters.
    tracker.meters_updated("nobody", [meter(1, 0.0)])
    tracker.link_changed("shure-ulxd-1", False, "silent")
    clock.now += 1.0
    tracker.flush_meters()
    assert len(meters) == 3


async def test_meter_timer_sends_the_latest_level_without_more_input(
    out: list[DeviceBody | OfflineBody], meters: list[MeterBody]
) -> None:
    tracker = StateTracker(out.append, meters.append, snapshot_interval_s=60.0, meter_rate_hz=20.0)
    tracker.track("dev")
    tracker.meters_updated("dev", [meter(1, -50.0)])
    tracker.meters_updated("dev", [meter(1, -49.0)])
    tracker.meters_updated("dev", [meter(1, -48.0)])
    assert [m.channels[0].audio_dbfs for m in meters] == [-50.0]
    async with asyncio.timeout(2):
        while len(meters) < 2:  # noqa: ASYNC110 - the timer fills the list
            await asyncio.sleep(0.01)
    assert meters[1].channels[0].audio_dbfs == -48.0
    await tracker.close()


async def test_periodic_snapshots_run_in_their_own_task(
    out: list[DeviceBody | OfflineBody], meters: list[MeterBody]
) -> None:
    tracker = StateTracker(out.append, meters.append, snapshot_interval_s=0.2, meter_rate_hz=4.0)
    tracker.start()
    tracker.device_updated(device())
    await asyncio.sleep(0.5)
    await tracker.close()
    await tracker.close()
    snapshots = [b for b in out if isinstance(b, DeviceBody) and b.is_snapshot]
    assert 2 <= len(snapshots) <= 4
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "state-snapshots"]


def test_bad_rates_are_refused(out: list[DeviceBody | OfflineBody], meters: list[MeterBody]) -> None:
    with pytest.raises(ValueError, match="positive"):
        StateTracker(out.append, meters.append, meter_rate_hz=0)
