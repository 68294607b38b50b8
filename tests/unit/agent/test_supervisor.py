"""The supervisor: one task per device, crash restarts with backoff, moves re-target, clean stop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from micboard.agent.discovery import FoundDevice
from micboard.agent.drivers.base import (
    CommandReply,
    DeviceListener,
    DeviceTarget,
    DriverCommand,
    DriverOptions,
    ReceiverDriver,
)
from micboard.agent.drivers.sennheiser import SscDriver
from micboard.agent.drivers.shure import ShureDriver
from micboard.agent.supervisor import DeviceSupervisor, default_driver, device_key_for
from micboard.shared.envelope import CommandOutcome
from micboard.shared.model import ChannelMeter, Device, Family, Vendor


class Recorder:
    """A SupervisedListener that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def device_updated(self, device: Device) -> None:
        self.calls.append(("device", device.device_key))

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        self.calls.append(("meters", device_key))

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        self.calls.append(("online" if online else f"offline:{reason}", device_key))

    def track(self, device_key: str) -> None:
        self.calls.append(("track", device_key))

    def forget(self, device_key: str) -> None:
        self.calls.append(("forget", device_key))


class FakeDriver(ReceiverDriver):
    """Reports one device, then runs until stopped, or crashes when told to."""

    built: list[FakeDriver] = []  # noqa: RUF012 - a per-test registry, reset by the fixture
    crash_first = 0

    def __init__(self, target: DeviceTarget, listener: DeviceListener, options: DriverOptions | None) -> None:
        super().__init__(target, listener, options)
        self._stop = asyncio.Event()
        self.stopped = False
        FakeDriver.built.append(self)

    @property
    def device(self) -> Device | None:
        return None

    @property
    def online(self) -> bool:
        return not self._stop.is_set()

    async def run(self) -> None:
        # One reconnect and one unparseable message per driver run, for the exported sums.
        self.stats.reconnects += 1
        self.stats.parse_errors += 1
        self.listener.device_updated(
            Device(device_key=self.target.device_key, vendor=Vendor.SHURE, family=self.target.family)
        )
        if FakeDriver.crash_first > 0:
            FakeDriver.crash_first -= 1
            raise RuntimeError("driver bug")
        await self._stop.wait()

    async def stop(self) -> None:
        self.stopped = True
        self._stop.set()

    async def execute(self, command: DriverCommand) -> CommandReply:
        return CommandReply(CommandOutcome.OK)


@pytest.fixture(autouse=True)
def reset() -> None:
    FakeDriver.built = []
    FakeDriver.crash_first = 0


def found(
    address: str = "10.0.0.5", port: int | None = 2202, device_id: str | None = "ULXD0001"
) -> FoundDevice:
    return FoundDevice(
        source="mdns", address=address, port=port, vendor=Vendor.SHURE, family=Family.ULXD,
        model="ULXD4D", device_id=device_id, supported=True,
    )  # fmt: skip


def supervisor(recorder: Recorder) -> DeviceSupervisor:
    return DeviceSupervisor(recorder, driver_factory=FakeDriver, restart_initial_s=0.05, restart_max_s=0.2)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_keys_and_driver_choice() -> None:
    assert device_key_for(found()) == "shure-ulxd0001"
    assert device_key_for(found(device_id=None)) == "ulxd-10.0.0.5-2202"
    listener = Recorder()
    shure = default_driver(DeviceTarget("127.0.0.1", 2202, Family.SLXD, "k"), listener, DriverOptions())
    ssc = default_driver(DeviceTarget("127.0.0.1", 45, Family.D6000, "k"), listener, DriverOptions())
    assert isinstance(shure, ShureDriver) and isinstance(ssc, SscDriver)


async def test_adopt_once_move_restarts_not_duplicates_and_close_stops() -> None:
    recorder = Recorder()
    sup = supervisor(recorder)
    key = await sup.adopt(found())
    assert key == "shure-ulxd0001" and await sup.adopt(found()) == key
    await settle()
    assert len(FakeDriver.built) == 1 and ("device", key) in recorder.calls

    # The same device at a new address: its driver restarts there, no second device.
    assert await sup.adopt(found(address="10.0.0.9")) == key
    await settle()
    assert len(sup) == 1 and sup.stats.moved == 1
    assert FakeDriver.built[0].stopped and FakeDriver.built[1].target.address == "10.0.0.9"

    # Seen again without its id at the same endpoint (another source): the same device.
    assert await sup.adopt(found(address="10.0.0.9", device_id=None)) == key
    assert len(sup) == 1 and len(FakeDriver.built) == 2

    other = await sup.adopt(found(address="10.0.0.10", device_id="ULXD0002"))
    assert other == "shure-ulxd0002" and sup.keys() == [key, other]
    assert await sup.remove(other) and not await sup.remove(other)
    assert ("forget", other) in recorder.calls

    await sup.close()
    await sup.close()
    assert all(d.stopped for d in FakeDriver.built)
    assert await sup.adopt(found(address="10.0.0.11", device_id="X")) is None  # closed
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("driver-")]


async def test_a_crashing_driver_is_restarted_with_backoff_and_counted() -> None:
    recorder = Recorder()
    sup = supervisor(recorder)
    FakeDriver.crash_first = 2
    key = await sup.adopt(found())
    assert key is not None
    async with asyncio.timeout(3):
        while len(FakeDriver.built) < 3:  # noqa: ASYNC110 - the supervisor builds drivers
            await asyncio.sleep(0.01)
    assert sup.stats.crashes == 2 and sup.stats.restarts == 2
    supervised = sup.get(key)
    assert supervised is not None and supervised.last_error == "RuntimeError: driver bug"
    assert recorder.calls.count(("offline:driver_crashed", key)) == 2
    assert recorder.calls.count(("track", key)) == 3  # each new driver starts with a snapshot
    assert sup.driver(key) is FakeDriver.built[-1]
    await sup.close()


async def test_counters_of_crashed_drivers_stay_in_the_sums() -> None:
    # A driver restarted after a crash starts from zero; the Prometheus counters built from the
    # sums must not drop back with it.
    sup = supervisor(Recorder())
    FakeDriver.crash_first = 2
    key = await sup.adopt(found())
    assert key is not None
    async with asyncio.timeout(3):
        while len(FakeDriver.built) < 3 or FakeDriver.built[-1].stats.reconnects == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    totals = sup.driver_stats()
    assert (totals["reconnects"], totals["parse_errors"]) == (3, 3)
    await sup.close()
    assert sup.driver_stats() == totals


async def test_unusable_sightings_are_ignored() -> None:
    sup = supervisor(Recorder())
    unsupported = FoundDevice(source="slp", address="10.0.0.7", port=2202, model="UR4D")
    assert await sup.adopt(unsupported) is None
    assert len(sup) == 0
    await sup.close()
