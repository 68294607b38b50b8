"""Device keys across agent restarts: real simulators, real drivers, two supervisors on one state dir.

A receiver's key comes from what discovery saw first: its address when the announcement has no
id. The supervisor remembers in the state directory under which key each id was published, so a
second run (a new supervisor on the same state directory) publishes a receiver that moved while
the agent was down, or that was found by another means, under the key the fleet knows.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from tests.supervised import SSC_FAST, Recorder
from tests.waiting import until

from micboard.agent.discovery import FoundDevice
from micboard.agent.drivers.base import DriverOptions
from micboard.agent.drivers.sennheiser import SscSimulator
from micboard.agent.drivers.shure import ShureSimulator
from micboard.agent.identities import DEVICE_KEYS_FILE
from micboard.agent.supervisor import DeviceSupervisor, device_key_for
from micboard.shared.model import Family, Vendor
from micboard.shared.natsd import free_port

SHURE_FAST = DriverOptions(
    connect_timeout_s=0.5,
    command_timeout_s=0.5,
    backoff_initial_s=0.1,
    backoff_max_s=0.2,
    poll_interval_s=0.5,
    silence_timeout_s=1.0,
)


def ssc(port: int, source: str = "mdns") -> FoundDevice:
    """An SSC receiver as its DNS-SD announcement (or a static entry) gives it: an address, no id."""
    return FoundDevice(
        source="static" if source == "static" else "mdns",
        address="127.0.0.1",
        port=port,
        vendor=Vendor.SENNHEISER,
        family=Family.EWDX,
    )


def shure(port: int, cid: str | None = None) -> FoundDevice:
    """A Shure receiver over SLP (with its component id) or over mDNS (without)."""
    return FoundDevice(
        source="slp" if cid else "mdns",
        address="127.0.0.1",
        port=port,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        device_id=cid,
    )


def is_pending(supervisor: DeviceSupervisor, key: str) -> bool:
    """Whether ``key``'s reports wait for its id."""
    device = supervisor.get(key)
    assert device is not None
    return device.pending


def remembered(state_dir: Path) -> dict[str, str]:
    """identity -> key, as the state directory keeps it."""
    body = json.loads((state_dir / DEVICE_KEYS_FILE).read_text(encoding="utf-8"))
    return {identity: entry["key"] for identity, entry in body["keys"].items()}


async def first_run(state_dir: Path, found: FoundDevice, options: DriverOptions) -> str:
    """One agent run: adopt ``found``, wait for its state, stop. Returns its key."""
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, options, restart_initial_s=0.1, state_dir=state_dir)
    try:
        key = await supervisor.adopt(found)
        assert key is not None
        await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
        # The id the driver read is remembered before the agent stops.
        await until(lambda: key in remembered(state_dir).values(), timeout_s=15.0)
    finally:
        await supervisor.close()
    return key


async def test_a_receiver_that_moved_while_the_agent_was_down_keeps_its_key(tmp_path: Path) -> None:
    before = SscSimulator("ewdx-em2", port=0, seed=7)
    await before.start()
    try:
        key = await first_run(tmp_path, ssc(before.port), SSC_FAST)
    finally:
        await before.stop()
    assert key == device_key_for(ssc(before.port))  # no id in the announcement: its address
    assert remembered(tmp_path) == {f"id:sennheiser:{before.serial}": key}

    # DHCP gave the receiver another address while the agent was down.
    after = SscSimulator("ewdx-em2", port=0, seed=7)
    await after.start()
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=tmp_path)
    try:
        assert after.serial == before.serial and after.port != before.port
        address_key = await supervisor.adopt(ssc(after.port))
        assert address_key is not None and address_key != key
        await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
        await until(lambda: ("meters", key) in recorder.calls, timeout_s=15.0)
        assert supervisor.keys() == [key]
        known = supervisor.get(key)
        assert known is not None and known.target.port == after.port
        assert supervisor.stats.recalled == 1 and supervisor.stats.moved == 0
        # Nothing of it was ever published under its address key.
        assert recorder.reported() == {key}
        # Seen again, the announcement is that same device.
        assert await supervisor.adopt(ssc(after.port)) == key
        assert supervisor.keys() == [key]
    finally:
        await supervisor.close()
        await after.stop()
    assert remembered(tmp_path) == {f"id:sennheiser:{before.serial}": key}


async def test_a_stale_static_entry_at_the_old_address_takes_the_receiver_found_elsewhere(
    tmp_path: Path,
) -> None:
    before = SscSimulator("ewdx-em2", port=0, seed=11)
    await before.start()
    try:
        key = await first_run(tmp_path, ssc(before.port, "static"), SSC_FAST)
    finally:
        await before.stop()

    # Next run: the static entry still names the old address (nothing answers there), and the
    # receiver is announced at its new one.
    after = SscSimulator("ewdx-em2", port=0, seed=11)
    await after.start()
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=tmp_path)
    try:
        assert await supervisor.adopt(ssc(before.port, "static")) == key  # its address key, remembered
        address_key = await supervisor.adopt(ssc(after.port))
        assert address_key is not None and address_key != key
        await until(lambda: supervisor.keys() == [key], timeout_s=15.0)
        known = supervisor.get(key)
        assert known is not None and known.target.port == after.port
        await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
        assert address_key not in recorder.reported()
        assert supervisor.stats.moved == 1
    finally:
        await supervisor.close()
        await after.stop()


async def test_another_receiver_given_a_remembered_address_gets_a_key_of_its_own(tmp_path: Path) -> None:
    port = free_port()
    gone = SscSimulator("ewdx-em2", port=port, seed=21)
    await gone.start()
    try:
        key = await first_run(tmp_path, ssc(port), SSC_FAST)
    finally:
        await gone.stop()

    # Next run: another receiver (another serial) answers at that address.
    newcomer = SscSimulator("ewdx-em2", port=port, seed=22)
    await newcomer.start()
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=tmp_path)
    try:
        assert newcomer.serial != gone.serial
        assert await supervisor.adopt(ssc(port)) == key  # most likely the device remembered there
        own = f"{key}-2"
        await until(lambda: ("device", own) in recorder.calls, timeout_s=15.0)
        # The remembered receiver's key never carried the newcomer's state.
        assert recorder.reported() == {own} and supervisor.keys() == [own]
    finally:
        await supervisor.close()
        await newcomer.stop()
    assert remembered(tmp_path) == {
        f"id:sennheiser:{gone.serial}": key,
        f"id:sennheiser:{newcomer.serial}": own,
    }


@pytest.mark.parametrize("first_over", ["slp", "mdns"])
async def test_a_shure_receiver_found_over_slp_on_one_boot_and_mdns_on_the_next_keeps_its_key(
    tmp_path: Path, first_over: str
) -> None:
    simulator = ShureSimulator("ulxd4", port=0, seed=3, activity=0.0)
    await simulator.start()
    cid = "7A1F3C52-0B4D-4E8A-9C61-2D5E8F0A1B3C"
    over_slp, over_mdns = shure(simulator.port, cid), shure(simulator.port)
    first, second = (over_slp, over_mdns) if first_over == "slp" else (over_mdns, over_slp)
    try:
        key = await first_run(tmp_path, first, SHURE_FAST)
        assert key == device_key_for(first)

        recorder = Recorder()
        supervisor = DeviceSupervisor(recorder, SHURE_FAST, restart_initial_s=0.1, state_dir=tmp_path)
        try:
            started_under = await supervisor.adopt(second)
            assert started_under == device_key_for(second) != key
            await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
            assert supervisor.keys() == [key] and supervisor.stats.recalled == 1
            assert recorder.reported() == {key}
            # The first boot's announcement, seen now too, is that same device.
            assert await supervisor.adopt(first) == key and supervisor.keys() == [key]
        finally:
            await supervisor.close()
    finally:
        await simulator.stop()
    keys = remembered(tmp_path)
    assert set(keys.values()) == {key}
    assert f"id:shure:{cid}" in keys and len(keys) == 2  # the SLP id and the device id


async def test_a_corrupt_key_file_is_set_aside_and_the_agent_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / DEVICE_KEYS_FILE).write_bytes(b'{"version": 1, "keys": {"id:sennheiser:1": ')
    simulator = SscSimulator("ewdx-em2", port=0, seed=5)
    await simulator.start()
    recorder = Recorder()
    try:
        with caplog.at_level(logging.WARNING, logger="micboard.agent.identities"):
            supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=tmp_path)
        assert "remembered device keys unreadable" in caplog.text
        assert (tmp_path / f"{DEVICE_KEYS_FILE}.corrupt").exists()
        try:
            key = await supervisor.adopt(ssc(simulator.port))
            assert key is not None
            # Nothing remembered: reported under its address at once, as without a state dir.
            await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
            assert not is_pending(supervisor, key)
            await until(
                lambda: remembered(tmp_path) == {f"id:sennheiser:{simulator.serial}": key}, timeout_s=15.0
            )
        finally:
            await supervisor.close()
    finally:
        await simulator.stop()


async def test_a_missing_state_dir_is_created_when_an_id_is_first_learned(tmp_path: Path) -> None:
    state_dir = tmp_path / "not" / "yet"
    simulator = SscSimulator("ewdx-em2", port=0, seed=6)
    await simulator.start()
    try:
        key = await first_run(state_dir, ssc(simulator.port), SSC_FAST)
    finally:
        await simulator.stop()
    assert remembered(state_dir) == {f"id:sennheiser:{simulator.serial}": key}


async def test_a_pending_receiver_that_never_answers_is_reported_offline_under_its_key(
    tmp_path: Path,
) -> None:
    before = SscSimulator("ewdx-em2", port=0, seed=8)
    await before.start()
    try:
        await first_run(tmp_path, ssc(before.port), SSC_FAST)
    finally:
        await before.stop()
    # Next run, a static entry names an address where nothing answers: once the id could not be
    # read in time, it shows offline under its own key, as without remembered keys.
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=tmp_path)
    try:
        silent = await supervisor.adopt(ssc(free_port(), "static"))
        assert silent is not None
        assert is_pending(supervisor, silent) and recorder.reported() == set()
        await until(lambda: ("link", silent) in recorder.calls, timeout_s=15.0)
        assert not is_pending(supervisor, silent) and supervisor.keys() == [silent]
    finally:
        await supervisor.close()


async def test_an_slp_id_remembered_under_an_address_key_is_adopted_under_it_at_once(tmp_path: Path) -> None:
    simulator = ShureSimulator("ulxd4", port=0, seed=4, activity=0.0)
    await simulator.start()
    cid = "0C9E2A41-6B7D-4F10-8E3A-5D2C1B0A9F87"
    try:
        # First boot: mDNS (no id) first, so its key is its address; SLP then names the same device.
        recorder = Recorder()
        supervisor = DeviceSupervisor(recorder, SHURE_FAST, restart_initial_s=0.1, state_dir=tmp_path)
        try:
            key = await supervisor.adopt(shure(simulator.port))
            assert key == device_key_for(shure(simulator.port))
            assert await supervisor.adopt(shure(simulator.port, cid)) == key
            await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
        finally:
            await supervisor.close()
        assert remembered(tmp_path)[f"id:shure:{cid}"] == key

        # Next boot, SLP first: the remembered key, from the start (nothing to re-key).
        recorder = Recorder()
        supervisor = DeviceSupervisor(recorder, SHURE_FAST, restart_initial_s=0.1, state_dir=tmp_path)
        try:
            assert await supervisor.adopt(shure(simulator.port, cid)) == key
            assert not is_pending(supervisor, key)
            await until(lambda: ("device", key) in recorder.calls, timeout_s=15.0)
            assert recorder.reported() == {key} and supervisor.stats.recalled == 0
        finally:
            await supervisor.close()
    finally:
        await simulator.stop()


async def test_two_receivers_that_swapped_addresses_keep_their_keys(tmp_path: Path) -> None:
    """Each holds the key the other was published under: both are re-keyed, neither gets a new one."""
    ports = [free_port(), free_port()]
    seeds = (31, 32)
    first = [SscSimulator("ewdx-em2", port=port, seed=seed) for port, seed in zip(ports, seeds, strict=True)]
    for simulator in first:
        await simulator.start()
    try:
        keys = [await first_run(tmp_path, ssc(port), SSC_FAST) for port in ports]
    finally:
        for simulator in first:
            await simulator.stop()
    serials = [simulator.serial for simulator in first]
    # The next boot: the same two receivers, each at the other's address.
    swapped = [
        SscSimulator("ewdx-em2", port=port, seed=seed)
        for port, seed in zip(reversed(ports), seeds, strict=True)
    ]
    for simulator in swapped:
        await simulator.start()
    recorder = Recorder()
    supervisor = DeviceSupervisor(recorder, SSC_FAST, restart_initial_s=0.1, state_dir=tmp_path)
    try:
        for port in ports:
            await supervisor.adopt(ssc(port))

        def settled() -> bool:
            devices = [supervisor.get(key) for key in supervisor.keys()]  # noqa: SIM118 - a method, not a dict
            return len(recorder.reported()) >= 2 and all(d is not None and not d.waiting for d in devices)

        await until(settled, timeout_s=20.0)
        assert recorder.reported() == set(keys)
        assert sorted(supervisor.keys()) == sorted(keys)
        wanted = {f"id:sennheiser:{serial}": key for serial, key in zip(serials, keys, strict=True)}
        assert remembered(tmp_path) == wanted
        for key, simulator in zip(keys, swapped, strict=True):
            # Each key now follows its receiver to the other port.
            device = supervisor.get(key)
            assert device is not None and device.target.port == simulator.port
    finally:
        await supervisor.close()
        for simulator in swapped:
            await simulator.stop()


async def test_an_adoption_waiting_for_the_lock_when_the_supervisor_closes_starts_nothing(
    tmp_path: Path,
) -> None:
    supervisor = DeviceSupervisor(Recorder(), SSC_FAST, state_dir=tmp_path)
    await supervisor._lock.acquire()  # another adoption, move or merge under way
    adopting = asyncio.create_task(supervisor.adopt(ssc(free_port())))
    await asyncio.sleep(0)
    await supervisor.close()
    supervisor._lock.release()
    assert await adopting is None
    assert supervisor.keys() == []
    others = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [name for name in others if name.startswith(("pending-", "driver-"))]
