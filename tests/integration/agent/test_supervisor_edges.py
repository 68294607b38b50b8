"""The supervisor with real drivers and a real simulator: key collisions, removal, strangers, stats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from micboard.agent.discovery import FoundDevice
from micboard.agent.drivers.base import DriverOptions
from micboard.agent.drivers.shure import ShureSimulator
from micboard.agent.supervisor import DeviceSupervisor
from micboard.shared.model import ChannelMeter, Device, Family, Vendor
from micboard.shared.natsd import free_port

FAST = DriverOptions(connect_timeout_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.2, poll_interval_s=0.5)


class Recorder:
    """The supervisor's listener: keeps every call, by device key."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def device_updated(self, device: Device) -> None:
        self.calls.append(("device", device.device_key))

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        self.calls.append(("meters", device_key))

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        self.calls.append(("link", device_key))

    def track(self, device_key: str) -> None:
        self.calls.append(("track", device_key))

    def forget(self, device_key: str) -> None:
        self.calls.append(("forget", device_key))


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def found(port: int, device_id: str) -> FoundDevice:
    return FoundDevice(
        source="static",
        address="127.0.0.1",
        port=port,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        device_id=device_id,
    )


async def test_colliding_keys_removal_and_strangers() -> None:
    simulator = ShureSimulator("ulxd4", port=0, seed=2, activity=0.0)
    await simulator.start()
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, FAST, restart_initial_s=0.1)
    try:
        first = await supervisor.adopt(found(simulator.port, "X"))
        # Nothing has run yet: no driver to count.
        assert supervisor.driver_stats() == {}
        # Another device whose id makes the same key (punctuation is folded): a suffix, never a clash.
        second = await supervisor.adopt(found(free_port(), "X!"))
        assert (first, second) == ("shure-x", "shure-x-2")
        await eventually(lambda: ("device", "shure-x") in recorder.calls)
        assert supervisor.driver_stats().get("connects", 0) >= 1
        # What drivers report about devices no longer supervised is not forwarded.
        before = len(recorder.calls)
        supervisor.device_updated(Device(device_key="stranger", vendor=Vendor.SHURE, family=Family.ULXD))
        supervisor.meters_updated("stranger", [])
        supervisor.link_changed("stranger", False, "gone")
        assert len(recorder.calls) == before
        assert await supervisor.remove("shure-x-2") is True
        assert await supervisor.remove("shure-x-2") is False
        assert ("forget", "shure-x-2") in recorder.calls and supervisor.keys() == ["shure-x"]
        assert supervisor.stats.removed == 1 and supervisor.driver("shure-x-2") is None
    finally:
        await supervisor.close()
        await simulator.stop()
    assert await supervisor.adopt(found(simulator.port, "Y")) is None  # closed: adopts nothing


def decreased(before: dict[str, int], after: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The counters that went down from ``before`` to ``after``: name -> (before, after)."""
    return {name: (count, after.get(name, 0)) for name, count in before.items() if after.get(name, 0) < count}


async def test_driver_counters_never_go_back_when_a_driver_is_replaced_or_removed() -> None:
    # The sums are exported as Prometheus counters: a driver replaced (the device moved) or
    # removed must leave its counts in them, or rate() and increase() see a reset.
    here = ShureSimulator("ulxd4", port=0, seed=4, activity=0.0)
    there = ShureSimulator("ulxd4", port=0, seed=5, activity=0.0)
    await here.start()
    await there.start()
    supervisor = DeviceSupervisor(Recorder(), FAST, restart_initial_s=0.1)

    def online_at(key: str, port: int) -> bool:
        driver = supervisor.driver(key)
        return driver is not None and driver.target.port == port and driver.online

    try:
        key = await supervisor.adopt(found(here.port, "MOVER"))
        assert key is not None
        await eventually(lambda: online_at(key, here.port))
        await here.drop_connections()
        await eventually(lambda: supervisor.driver_stats().get("reconnects", 0) >= 1)
        before_move = supervisor.driver_stats()
        # Same device, new address (DHCP): a new driver, whose own counters start at zero.
        await supervisor.adopt(found(there.port, "MOVER"))
        await eventually(lambda: online_at(key, there.port))
        after_move = supervisor.driver_stats()
        assert decreased(before_move, after_move) == {}
        assert after_move["reconnects"] >= 1
        assert after_move["connects"] >= before_move["connects"] + 1
        before_removal = supervisor.driver_stats()
        assert await supervisor.remove(key) is True
        after_removal = supervisor.driver_stats()
        assert decreased(before_removal, after_removal) == {}
        assert supervisor.driver_stats() == after_removal  # nothing runs any more: the totals stay
    finally:
        await supervisor.close()
        await here.stop()
        await there.stop()
