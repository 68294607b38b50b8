"""The supervisor with real drivers and a real simulator: key collisions, removal, strangers, stats."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.supervised import SSC_FAST, Recorder

from micboard.agent.discovery import FoundDevice
from micboard.agent.drivers.base import DriverOptions
from micboard.agent.drivers.sennheiser import SscSimulator
from micboard.agent.drivers.shure import ShureSimulator
from micboard.agent.supervisor import DeviceSupervisor
from micboard.shared.model import Device, Family, Vendor
from micboard.shared.natsd import free_port

FAST = DriverOptions(connect_timeout_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.2, poll_interval_s=0.5)


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


def found_ssc(port: int) -> FoundDevice:
    """An SSC receiver as its DNS-SD announcement gives it: an address, no id."""
    return FoundDevice(
        source="mdns", address="127.0.0.1", port=port, vendor=Vendor.SENNHEISER, family=Family.EWDX
    )


@pytest.mark.parametrize("remembering", [False, True], ids=["no-state-dir", "state-dir"])
async def test_a_receiver_found_at_a_new_address_is_recognised_by_its_serial_not_duplicated(
    tmp_path: Path, remembering: bool
) -> None:
    # The same within one run whether or not keys are remembered across runs (a state dir).
    first = SscSimulator("ewdx-em2", port=0, seed=7)
    await first.start()
    moved: SscSimulator | None = None
    recorder = Recorder()
    state_dir = tmp_path if remembering else None
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=state_dir)
    try:
        old_key = await supervisor.adopt(found_ssc(first.port))
        assert old_key is not None
        await eventually(lambda: ("device", old_key) in recorder.calls)
        # DHCP gives the receiver another address: the old one goes quiet, it answers at the new one.
        await first.stop()
        moved = SscSimulator("ewdx-em2", port=0, seed=7)
        await moved.start()
        assert moved.serial == first.serial and moved.port != first.port
        new_key = await supervisor.adopt(found_ssc(moved.port))
        assert new_key is not None and new_key != old_key  # no id in the announcement: its address
        await eventually(lambda: supervisor.keys() == [old_key], timeout_s=15)
        known = supervisor.get(old_key)
        assert known is not None and known.target.port == moved.port
        assert supervisor.stats.moved == 1
        # Reported again under the key the fleet knows; nothing was ever reported under the new one.
        merged_at = recorder.calls.index(("forget", new_key))
        await eventually(lambda: ("device", old_key) in recorder.calls[merged_at:])
        assert ("device", new_key) not in recorder.calls and ("meters", new_key) not in recorder.calls
        # The announcement seen again is that same device.
        assert await supervisor.adopt(found_ssc(moved.port)) == old_key
        assert supervisor.stats.recalled == 0
        if remembering:
            assert supervisor.key_memory.key_for(f"id:sennheiser:{first.serial}") == old_key
    finally:
        await supervisor.close()
        await first.stop()
        if moved is not None:
            await moved.stop()


@pytest.mark.parametrize("remembering", [False, True], ids=["no-state-dir", "state-dir"])
async def test_two_receivers_answering_under_one_id_are_both_kept(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, remembering: bool
) -> None:
    # Two receivers that report the same id (as two Shure receivers left with one device id
    # would), both answering: told apart once the first one's link stays up, and both reported.
    one = SscSimulator("ewdx-em2", port=0, seed=9)
    two = SscSimulator("ewdx-em2", port=0, seed=9)
    await one.start()
    await two.start()
    recorder = Recorder()
    state_dir = tmp_path if remembering else None
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=state_dir)
    try:
        first = await supervisor.adopt(found_ssc(one.port))
        await eventually(lambda: ("device", first) in recorder.calls)
        with caplog.at_level(logging.WARNING, logger="micboard.agent.supervisor"):
            second = await supervisor.adopt(found_ssc(two.port))
            await eventually(lambda: ("device", second) in recorder.calls, timeout_s=15)
        assert first is not None and second is not None
        assert sorted(supervisor.keys()) == sorted([first, second]) and supervisor.stats.moved == 0
        assert "two devices report the same id; both are kept" in caplog.text
        if remembering:
            # The id stays the first one's: the second is not remembered under it.
            assert supervisor.key_memory.key_for(f"id:sennheiser:{one.serial}") == first
    finally:
        await supervisor.close()
        await one.stop()
        await two.stop()
