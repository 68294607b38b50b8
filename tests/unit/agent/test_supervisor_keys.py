"""Remembered device keys in the supervisor, with scripted drivers: who keeps a key that two claim.

Each fake receiver is an address: whether it answers, the id it reads and how long it takes to
read it are set per address. A first supervisor learns ids under keys; a second one on the same
state directory is "the next run".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.supervised import Recorder

from micboard.agent.discovery import FoundDevice
from micboard.agent.drivers.base import (
    CommandReply,
    DeviceListener,
    DeviceTarget,
    DriverCommand,
    DriverOptions,
    ReceiverDriver,
)
from micboard.agent.identities import DeviceKeyMemory
from micboard.agent.supervisor import DeviceSupervisor
from micboard.shared.envelope import CommandOutcome
from micboard.shared.model import Device, Family, Vendor

OPTIONS = DriverOptions(connect_timeout_s=0.1, command_timeout_s=0.1, silence_timeout_s=0.2)


@dataclass
class Receiver:
    """What answers at one address."""

    serial: str | None
    answers: bool = True
    delay_s: float = 0.0


RECEIVERS: dict[str, Receiver] = {}


class ScriptedDriver(ReceiverDriver):
    """Answers as :data:`RECEIVERS` says for its address: link up, its state (with its id), meters."""

    def __init__(self, target: DeviceTarget, listener: DeviceListener, options: DriverOptions | None) -> None:
        super().__init__(target, listener, options)
        self._stop = asyncio.Event()
        self._online = False

    @property
    def device(self) -> Device | None:
        return None

    @property
    def online(self) -> bool:
        return self._online

    async def run(self) -> None:
        receiver = RECEIVERS.get(self.target.address)
        if receiver is None or not receiver.answers:
            self.listener.link_changed(self.target.device_key, False, "connect_failed")
            await self._stop.wait()
            return
        self._online = True
        self.listener.link_changed(self.target.device_key, True, "answering")
        await asyncio.sleep(receiver.delay_s)
        device = Device(
            device_key=self.target.device_key,
            vendor=Vendor.SENNHEISER,
            family=Family.EWDX,
            device_id=receiver.serial,
        )
        self.listener.device_updated(device)
        self.listener.meters_updated(self.target.device_key, [])
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()

    async def execute(self, command: DriverCommand) -> CommandReply:
        return CommandReply(CommandOutcome.OK)


@pytest.fixture(autouse=True)
def receivers() -> None:
    RECEIVERS.clear()


def ssc(address: str, serial: str | None = None) -> FoundDevice:
    return FoundDevice(
        source="mdns",
        address=address,
        port=45,
        vendor=Vendor.SENNHEISER,
        family=Family.EWDX,
        device_id=serial,
    )


def key_of(address: str) -> str:
    return f"ewdx-{address}-45"


def run(recorder: Recorder, state_dir: Path | None) -> DeviceSupervisor:
    return DeviceSupervisor(
        recorder, OPTIONS, driver_factory=ScriptedDriver, restart_initial_s=0.05, state_dir=state_dir
    )


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def files_in(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def remember(state_dir: Path, **keys: str) -> None:
    """A previous run that published serial ``name`` under key ``value``."""
    memory = DeviceKeyMemory.in_state_dir(state_dir)
    for serial, key in keys.items():
        memory.remember(f"id:sennheiser:{serial}", key)


async def test_a_remembered_key_held_by_a_receiver_that_answers_without_an_id_stays_its(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remember(tmp_path, S1=key_of("10.0.0.1"))
    RECEIVERS["10.0.0.1"] = Receiver(serial=None)  # answers, reads no id
    RECEIVERS["10.0.0.2"] = Receiver(serial="S1", delay_s=0.05)
    recorder = Recorder()
    sup = run(recorder, tmp_path)
    try:
        assert await sup.adopt(ssc("10.0.0.1")) == key_of("10.0.0.1")
        await eventually(lambda: ("device", key_of("10.0.0.1")) in recorder.calls)
        with caplog.at_level(logging.WARNING, logger="micboard.agent.supervisor"):
            assert await sup.adopt(ssc("10.0.0.2")) == key_of("10.0.0.2")
            await eventually(lambda: ("device", key_of("10.0.0.2")) in recorder.calls)
        assert "remembered device key is held by another device that answers" in caplog.text
        assert sup.keys() == [key_of("10.0.0.1"), key_of("10.0.0.2")] and sup.stats.recalled == 0
    finally:
        await sup.close()
    # Remembered under the key it was published under this time.
    assert DeviceKeyMemory.in_state_dir(tmp_path).key_for("id:sennheiser:S1") == key_of("10.0.0.2")


async def test_a_receiver_holding_another_ones_key_moves_off_it_and_frees_it(tmp_path: Path) -> None:
    # Last run: S1 at .1 and S2 at .2. Now S2 has .1 and S1 has .3.
    remember(tmp_path, S1=key_of("10.0.0.1"), S2=key_of("10.0.0.2"))
    RECEIVERS["10.0.0.1"] = Receiver(serial="S2", delay_s=0.1)
    RECEIVERS["10.0.0.3"] = Receiver(serial="S1")
    recorder = Recorder()
    sup = run(recorder, tmp_path)
    try:
        assert await sup.adopt(ssc("10.0.0.1")) == key_of("10.0.0.1")
        assert await sup.adopt(ssc("10.0.0.3")) == key_of("10.0.0.3")
        await eventually(lambda: sup.keys() == [key_of("10.0.0.1"), key_of("10.0.0.2")])
        await eventually(lambda: {"device"} <= {k for k, key in recorder.calls if key == key_of("10.0.0.2")})
        await eventually(lambda: ("device", key_of("10.0.0.1")) in recorder.calls)
        s1, s2 = sup.get(key_of("10.0.0.1")), sup.get(key_of("10.0.0.2"))
        assert s1 is not None and s1.target.address == "10.0.0.3"
        assert s2 is not None and s2.target.address == "10.0.0.1"
        assert recorder.reported() == {key_of("10.0.0.1"), key_of("10.0.0.2")}
        assert sup.stats.recalled == 2
    finally:
        await sup.close()


async def test_a_remembered_key_held_by_one_that_turns_out_to_have_the_same_id_keeps_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two receivers with one id (as two Shure receivers left with one device id): the one at the
    # remembered address reads its id last; the other waits for it, then both are kept.
    remember(tmp_path, S1=key_of("10.0.0.1"))
    RECEIVERS["10.0.0.1"] = Receiver(serial="S1", delay_s=0.2)
    RECEIVERS["10.0.0.2"] = Receiver(serial="S1")
    recorder = Recorder()
    sup = run(recorder, tmp_path)
    try:
        await sup.adopt(ssc("10.0.0.1"))
        with caplog.at_level(logging.WARNING, logger="micboard.agent.supervisor"):
            await sup.adopt(ssc("10.0.0.2"))
            await eventually(lambda: ("device", key_of("10.0.0.2")) in recorder.calls)
        assert "two devices report the same id; both are kept" in caplog.text
        assert ("device", key_of("10.0.0.1")) in recorder.calls
        assert sup.keys() == [key_of("10.0.0.1"), key_of("10.0.0.2")] and sup.stats.recalled == 0
    finally:
        await sup.close()


async def test_an_announced_id_remembered_under_a_held_key_waits_for_the_holder(tmp_path: Path) -> None:
    # Announced with its id, remembered under the key a receiver that does not answer holds now
    # (a static entry at the old address): merged into it, re-targeted to where it answers.
    remember(tmp_path, S1=key_of("10.0.0.1"))
    RECEIVERS["10.0.0.1"] = Receiver(serial=None, answers=False)
    RECEIVERS["10.0.0.2"] = Receiver(serial="S1")
    recorder = Recorder()
    sup = run(recorder, tmp_path)
    try:
        assert await sup.adopt(ssc("10.0.0.1")) == key_of("10.0.0.1")
        provisional = await sup.adopt(ssc("10.0.0.2", serial="S1"))
        assert provisional == "sennheiser-s1"
        await eventually(lambda: sup.keys() == [key_of("10.0.0.1")])
        held = sup.get(key_of("10.0.0.1"))
        assert held is not None and held.target.address == "10.0.0.2" and sup.stats.moved == 1
        await eventually(lambda: ("device", key_of("10.0.0.1")) in recorder.calls)
        assert provisional not in recorder.reported()
    finally:
        await sup.close()


async def test_no_state_dir_changes_nothing(tmp_path: Path) -> None:
    RECEIVERS["10.0.0.1"] = Receiver(serial="S1")
    recorder = Recorder()
    sup = run(recorder, None)
    try:
        key = await sup.adopt(ssc("10.0.0.1"))
        assert key is not None and not sup.get(key).pending  # type: ignore[union-attr]
        await eventually(lambda: ("device", key) in recorder.calls)
        assert len(sup.key_memory) == 1 and sup.key_memory.writes == 0
    finally:
        await sup.close()
    assert files_in(tmp_path) == []
