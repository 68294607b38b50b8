"""The SSC v1 driver against the SSC simulator over real loopback UDP sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from micboard.agent.drivers.base import DeviceTarget, DriverCommand, DriverOptions
from micboard.agent.drivers.sennheiser import SSC_SIMULATOR_KINDS, SscDriver, SscSimulator
from micboard.agent.drivers.sennheiser.protocol import SSC_SERVICE_TYPE
from micboard.shared.envelope import CommandAction, CommandOutcome
from micboard.shared.model import Antenna, ChannelMeter, Device, Family, ReceiverChannel, Transmitter

FAST = DriverOptions(
    meter_interval_ms=50,
    silence_timeout_s=1.0,
    connect_timeout_s=0.6,
    command_timeout_s=0.6,
    backoff_initial_s=0.1,
    backoff_max_s=0.4,
    poll_interval_s=0.5,
)


class Recorder:
    """A DeviceListener that keeps everything it is told."""

    def __init__(self) -> None:
        self.devices: list[Device] = []
        self.meters: list[ChannelMeter] = []
        self.links: list[tuple[bool, str]] = []

    def device_updated(self, device: Device) -> None:
        self.devices.append(device)

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        assert device_key == "ssc-test"
        self.meters.extend(meters)

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        assert device_key == "ssc-test"
        self.links.append((online, reason))

    def meters_of(self, index: int) -> list[ChannelMeter]:
        return [meter for meter in self.meters if meter.index == index]

    def channel(self, index: int) -> ReceiverChannel:
        """Channel ``index`` of the latest device snapshot."""
        return channel_of(self.devices[-1], index)

    def transmitter(self, index: int) -> Transmitter | None:
        return self.channel(index).transmitter


def channel_of(device: Device, index: int) -> ReceiverChannel:
    channel = device.channel(index)
    assert channel is not None
    return channel


async def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def rig(
    kind: str = "ewdx-em2",
    *,
    seed: int = 1,
    time_scale: float = 1.0,
    options: DriverOptions = FAST,
    **driver_kwargs: Any,
) -> AsyncIterator[tuple[SscSimulator, SscDriver, Recorder]]:
    simulator = SscSimulator(kind, port=0, seed=seed, time_scale=time_scale)
    await simulator.start()
    recorder = Recorder()
    target = DeviceTarget("127.0.0.1", simulator.port, simulator.family, "ssc-test")
    driver_kwargs.setdefault("subscription_lifetime_s", 1.0)
    driver = SscDriver(target, recorder, options, **driver_kwargs)
    task = asyncio.create_task(driver.run())
    try:
        yield simulator, driver, recorder
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 2.0)
        assert not driver.online
        await simulator.stop()


async def online(driver: SscDriver, recorder: Recorder) -> Device:
    await eventually(lambda: driver.online and driver.device is not None)
    assert recorder.links[0] == (True, "answering")
    assert driver.device is not None
    return driver.device


@pytest.mark.parametrize("kind", sorted(SSC_SIMULATOR_KINDS))
async def test_identity_state_and_meters_of_every_kind(kind: str) -> None:
    async with rig(kind) as (simulator, driver, recorder):
        device = await online(driver, recorder)
        spec = SSC_SIMULATOR_KINDS[kind]
        assert device.family is spec.family
        assert (device.model, device.serial, device.device_id, device.firmware) == (
            spec.product,
            simulator.serial,
            simulator.device_id,
            spec.firmware,
        )
        assert device.name == simulator.device_name
        assert device.port == simulator.port
        assert device.channel_count == spec.channels
        for sim_channel in simulator.channels:
            channel = device.channel(sim_channel.index)
            assert channel is not None
            assert channel.name == sim_channel.name
            assert channel.name_id == sim_channel.name.split()[0]
            assert channel.frequency_khz == sim_channel.frequency_khz
            assert channel.audio_gain_db == sim_channel.gain_db
            assert channel.muted is False
            tx = channel.transmitter
            assert tx is not None
            assert tx.model == sim_channel.transmitter.model
            assert tx.battery_type == spec.battery_type
            assert tx.tx_offset_db == sim_channel.transmitter.trim_db
            assert tx.battery_percent == sim_channel.transmitter.gauge_percent
            assert tx.runtime_min is not None
            assert abs(tx.runtime_min - sim_channel.transmitter.battery_remaining_min) <= 1
        await eventually(lambda: all(recorder.meters_of(i) for i in range(1, spec.channels + 1)))
        meter = recorder.meters_of(1)[-1]
        assert meter.link_quality_percent is not None and meter.link_quality_percent > 0
        assert meter.active_antenna is not None
        # One level, on the antenna diversity chose.
        slot = 1 if meter.active_antenna is Antenna.B else 0
        assert len(meter.rf_dbm) == slot + 1 and meter.rf_dbm[:slot] == (None,) * slot
        level = meter.rf_dbm[slot]
        assert level is not None and -107 <= level <= 0
        assert meter.audio_dbfs is not None and -138.5 <= meter.audio_dbfs <= 0
        assert driver.stats.connects == 1 and driver.stats.parse_errors == 0
    assert simulator.subscription_count == 0


async def test_the_name_configured_for_a_static_device_wins_over_the_one_it_reports() -> None:
    # As with Shure: the operator listed the receiver under a name, and that is what they see.
    simulator = SscSimulator("ewdx-em4", port=0, seed=1)
    await simulator.start()
    recorder = Recorder()
    target = DeviceTarget("127.0.0.1", simulator.port, simulator.family, "ssc-test", "Rack 3 EM4")
    driver = SscDriver(target, recorder, FAST, subscription_lifetime_s=1.0)
    task = asyncio.create_task(driver.run())
    try:
        device = await online(driver, recorder)
        assert simulator.device_name != "Rack 3 EM4"
        assert device.name == "Rack 3 EM4"
        assert all(reported.name == "Rack 3 EM4" for reported in recorder.devices)
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 2.0)
        await simulator.stop()


async def test_subscription_is_renewed_before_its_lifetime_ends_and_cancelled_on_stop() -> None:
    async with rig(subscription_lifetime_s=0.3) as (simulator, driver, recorder):
        await online(driver, recorder)
        await eventually(lambda: simulator.subscription_count == 1)
        await asyncio.sleep(1.0)  # more than three lifetimes
        before = len(recorder.meters)
        await asyncio.sleep(0.4)
        assert len(recorder.meters) - before >= 8  # 2 channels at ~20 Hz, still flowing
        assert simulator.subscription_count == 1
    await eventually(lambda: simulator.subscription_count == 0, 1.0)


async def test_metering_off_subscribes_to_nothing_and_a_long_interval_stays_valid() -> None:
    # meter_interval_ms 0 switches metering off (as METER_RATE 00000 does on Shure).
    async with rig(options=replace(FAST, meter_interval_ms=0)) as (simulator, driver, recorder):
        await online(driver, recorder)
        await asyncio.sleep(0.3)
        assert simulator.subscription_count == 0 and recorder.meters == []
    # Above the subscription's "max" (10 s) the driver asks for the slowest valid rate.
    async with rig(options=replace(FAST, meter_interval_ms=30_000)) as (simulator, driver, recorder):
        await online(driver, recorder)
        await eventually(lambda: simulator.subscription_count == 1)
        assert driver.stats.device_errors == 0  # the subscription was not refused


async def test_meters_come_back_after_the_device_forgets_subscribers() -> None:
    async with rig(subscription_lifetime_s=0.5) as (simulator, driver, recorder):
        await online(driver, recorder)
        await eventually(lambda: simulator.subscription_count == 1)
        await simulator.drop_connections()
        assert simulator.subscription_count == 0
        await eventually(lambda: simulator.subscription_count == 1, 1.5)
        count = len(recorder.meters)
        await eventually(lambda: len(recorder.meters) > count + 4)


async def longest_meter_gap(recorder: Recorder, duration_s: float) -> float:
    """The longest time in ``duration_s`` without a new meter, sampled every 10 ms."""
    started = last = time.monotonic()
    count, gap = len(recorder.meters), 0.0
    while (now := time.monotonic()) - started < duration_s:
        if len(recorder.meters) > count:
            count, last = len(recorder.meters), now
        gap = max(gap, now - last)
        await asyncio.sleep(0.01)
    return gap


async def test_slow_replies_do_not_let_the_meter_subscription_lapse() -> None:
    # Every reply 0.7 s late with a 1 s lifetime: renewals are due a fixed time after the last
    # one was sent, not a period after its reply (which came 1.6 s apart, a 0.6 s gap each time).
    options = replace(FAST, command_timeout_s=2.4, silence_timeout_s=3.0)
    async with rig(options=options, subscription_lifetime_s=1.0) as (simulator, driver, recorder):
        await online(driver, recorder)
        await eventually(lambda: len(recorder.meters) > 4)
        simulator.faults.delay_s = 0.7
        assert await longest_meter_gap(recorder, 2.5) < 0.45
        assert driver.online and simulator.subscription_count == 1


async def test_the_subscription_comes_back_promptly_after_renewals_were_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The device hears nothing for a while: renewals are lost and its subscription lapses. Once
    # it hears again, the next renewal is one resend interval (0.2 s) after the last lost one,
    # not a whole period (1.8 s of a 2 s lifetime) later.
    caplog.set_level(logging.INFO, logger="micboard.agent.drivers.sennheiser.driver")

    def lost() -> int:
        return sum(r.getMessage() == "ssc subscription unanswered" for r in caplog.records)

    # No poll and no silence verdict meanwhile: this is about the subscription alone.
    options = replace(FAST, silence_timeout_s=10.0, poll_interval_s=10.0)
    async with rig(options=options, subscription_lifetime_s=2.0) as (simulator, driver, recorder):
        await online(driver, recorder)
        await eventually(lambda: simulator.subscription_count == 1)
        simulator.faults.silent = True
        await eventually(lambda: simulator.subscription_count == 0)  # lapsed on the device
        before = lost()
        await eventually(lambda: lost() > before)  # a renewal was lost just now
        simulator.faults.silent = False
        heard_at, count = time.monotonic(), len(recorder.meters)
        await eventually(lambda: len(recorder.meters) > count)
        assert time.monotonic() - heard_at < 0.8
        assert simulator.subscription_count == 1
        assert driver.online and recorder.links == [(True, "answering")]


async def test_rename_reaches_the_simulator_and_invalid_names_are_refused() -> None:
    async with rig() as (simulator, driver, recorder):
        await online(driver, recorder)
        reply = await driver.execute(DriverCommand(CommandAction.RENAME, channel=2, value="VOX 1"))
        assert reply.outcome is CommandOutcome.OK
        assert simulator.channel(2).name == "VOX 1"
        await eventually(lambda: recorder.channel(2).name == "VOX 1")
        for bad in ("TOO LONG NAME", "", "Zoë"):
            refused = await driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value=bad))
            assert refused.outcome is CommandOutcome.INVALID
        missing = await driver.execute(DriverCommand(CommandAction.RENAME, channel=1))
        assert missing.outcome is CommandOutcome.INVALID
        wrong_channel = await driver.execute(DriverCommand(CommandAction.RENAME, channel=3, value="A"))
        assert wrong_channel.outcome is CommandOutcome.INVALID
        assert simulator.channel(1).name != "VOX 1"


async def test_em6000_refuses_punctuation_in_names() -> None:
    async with rig("em6000") as (_, driver, recorder):
        await online(driver, recorder)
        reply = await driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="HH_01"))
        assert reply.outcome is CommandOutcome.INVALID
        assert reply.detail is not None and "_" in reply.detail


async def test_identify_mute_and_unsupported_commands() -> None:
    async with rig("ewdx-em4") as (simulator, driver, recorder):
        await online(driver, recorder)
        assert (await driver.execute(DriverCommand(CommandAction.IDENTIFY))).outcome is CommandOutcome.OK
        assert simulator.identify_count == 1
        mute = await driver.execute(DriverCommand(CommandAction.MUTE, channel=4))
        assert mute.outcome is CommandOutcome.OK
        assert simulator.channel(4).muted is True
        await eventually(lambda: recorder.channel(4).muted is True)
        unmute = await driver.execute(DriverCommand(CommandAction.UNMUTE, channel=4))
        assert unmute.outcome is CommandOutcome.OK
        assert simulator.channel(4).muted is False
        reply = await driver.execute(DriverCommand(CommandAction.REDISCOVER))
        assert reply.outcome is CommandOutcome.NOT_SUPPORTED


async def test_device_errors_become_failed_commands() -> None:
    async with rig() as (simulator, driver, recorder):
        await online(driver, recorder)
        simulator.locked = True
        reply = await driver.execute(DriverCommand(CommandAction.MUTE, channel=1))
        assert reply.outcome is CommandOutcome.FAILED
        assert reply.detail is not None and "423" in reply.detail and "/rx1/mute" in reply.detail
        simulator.locked = False
        simulator.faults.rep_err = True
        reply = await driver.execute(DriverCommand(CommandAction.IDENTIFY))
        assert reply.outcome is CommandOutcome.FAILED
        assert reply.detail is not None and "500" in reply.detail
        errors = driver.stats.device_errors
        assert errors >= 2
        snapshot = recorder.devices[-1]
        await asyncio.sleep(1.0)  # a poll and a subscription renewal, all answered with 500
        assert driver.online  # an error answer is still an answer
        assert driver.stats.device_errors > errors + 2
        assert recorder.devices[-1] == snapshot  # the last good state is kept


async def test_an_error_on_some_leaves_keeps_the_rest_of_the_reply() -> None:
    # A model or firmware without a queried parameter answers 454 for it and fills the others:
    # the channel's name and the transmitter's battery must still be read, and an errored leaf
    # keeps what it said before rather than going blank.
    async with rig("ewdx-em2") as (simulator, driver, recorder):
        await online(driver, recorder)
        before = recorder.transmitter(1)
        assert before is not None and before.battery_percent is not None and before.model is not None
        full_tree = simulator.tree

        def without_some_leaves() -> dict[str, Any]:
            tree = full_tree()
            del tree["rx1"]["gain"]
            if "tx1" in tree["mates"]:
                del tree["mates"]["tx1"]["battery"]["gauge"]
                del tree["mates"]["tx1"]["trim"]
            return tree

        simulator.tree = without_some_leaves  # type: ignore[method-assign]
        errors = driver.stats.device_errors
        simulator.set_channel_name(1, "Lead Vox")
        await eventually(lambda: recorder.channel(1).name == "Lead Vox")
        assert driver.stats.device_errors > errors  # each errored reply is counted
        after = recorder.transmitter(1)
        assert after is not None and after.model == before.model
        assert after.battery_percent is not None  # kept from the last good answer, not blanked


async def test_transmitter_off_reads_as_no_transmitter_and_comes_back() -> None:
    async with rig("ewdx-em4") as (simulator, driver, recorder):
        await online(driver, recorder)
        simulator.set_transmitter_on(3, False)
        await eventually(lambda: recorder.transmitter(3) is None)
        device = recorder.devices[-1]
        assert all(channel_of(device, i).transmitter is not None for i in (1, 2, 4))
        await eventually(lambda: recorder.meters_of(3)[-1].link_quality_percent == 0)
        assert recorder.meters_of(3)[-1].active_antenna is None
        assert driver.stats.device_errors == 0  # 424 is "no transmitter", not a failure
        simulator.set_transmitter_on(3, True)
        await eventually(lambda: recorder.transmitter(3) is not None)


async def test_battery_drains_and_changes_reach_the_listener() -> None:
    async with rig(time_scale=600.0) as (simulator, driver, recorder):
        device = await online(driver, recorder)
        first = channel_of(device, 1).transmitter
        assert first is not None and first.runtime_min is not None
        start_min = first.runtime_min

        def drained() -> bool:
            tx = recorder.transmitter(1)
            return tx is not None and tx.runtime_min is not None and tx.runtime_min <= start_min - 5

        await eventually(drained)
        simulator.set_battery(2, 8, 40)
        simulator.set_warnings(2, ["AfPeak"])

        def low() -> bool:
            return recorder.channel(2).warnings == ("AfPeak", "LowBattery")

        await eventually(low)
        tx = recorder.transmitter(2)
        assert tx is not None and tx.battery_percent is not None and tx.battery_percent <= 8
        assert tx.battery_bars == 1
        simulator.set_battery(2, None, None)
        await eventually(lambda: getattr(recorder.transmitter(2), "battery_percent", 0) is None)


async def test_silent_device_is_reported_offline_in_time_and_online_again() -> None:
    async with rig() as (simulator, driver, recorder):
        await online(driver, recorder)
        snapshots = len(recorder.devices)
        simulator.faults.silent = True
        silent_at = time.monotonic()
        await eventually(lambda: not driver.online, FAST.silence_timeout_s + 1.0)
        assert time.monotonic() - silent_at <= FAST.silence_timeout_s + 1.0
        assert recorder.links[-1] == (False, "silent")
        refused = await driver.execute(DriverCommand(CommandAction.IDENTIFY))
        assert refused.outcome is CommandOutcome.DEVICE_OFFLINE
        simulator.faults.silent = False
        await eventually(lambda: driver.online, 2.0)
        assert recorder.links[-1] == (True, "answering")
        assert len(recorder.devices) > snapshots  # a full re-read after coming back
        assert driver.stats.reconnects == 1
        assert recorder.links.count((False, "silent")) == 1


async def test_lost_datagrams_are_tolerated() -> None:
    async with rig("ewdx-em4", request_attempts=6) as (simulator, driver, recorder):
        simulator.faults.loss = 0.25
        device = await online(driver, recorder)
        assert all(channel_of(device, i).transmitter is not None for i in range(1, 5))
        assert all(channel_of(device, i).name == simulator.channel(i).name for i in range(1, 5))
        reply = await driver.execute(DriverCommand(CommandAction.MUTE, channel=2))
        assert reply.outcome is CommandOutcome.OK
        await asyncio.sleep(1.2)
        assert driver.online and recorder.links == [(True, "answering")]
        assert recorder.meters_of(4)


async def test_garbage_is_counted_and_skipped() -> None:
    async with rig() as (simulator, driver, recorder):
        simulator.faults.garbage = True
        device = await online(driver, recorder)
        assert channel_of(device, 1).name == simulator.channel(1).name
        await eventually(lambda: driver.stats.parse_errors >= 5 and len(recorder.meters) >= 10)
        assert driver.stats.dropped_bytes > 0
        assert all(meter.index in (1, 2) for meter in recorder.meters)
        assert driver.online


async def test_slow_answers_within_the_timeout_are_fine_later_ones_fail() -> None:
    async with rig() as (simulator, driver, recorder):
        simulator.faults.delay_s = 0.1
        await online(driver, recorder)
        reply = await driver.execute(DriverCommand(CommandAction.MUTE, channel=1))
        assert reply.outcome is CommandOutcome.OK
        simulator.faults.delay_s = FAST.command_timeout_s + 0.2
        late = await driver.execute(DriverCommand(CommandAction.UNMUTE, channel=1))
        assert late.outcome is CommandOutcome.FAILED
        assert late.detail == "no answer within 0.6 s"
        assert driver.online  # meters still arrive, and so do the late answers


async def test_device_refusing_identity_is_not_online_until_it_answers() -> None:
    async with rig() as (simulator, driver, recorder):
        simulator.faults.rep_err = True
        await eventually(lambda: recorder.links == [(False, "connect_failed")])
        await eventually(lambda: driver.stats.device_errors >= 2)
        assert driver.device is None
        simulator.faults.rep_err = False
        await eventually(lambda: driver.online and driver.device is not None)
        assert recorder.links == [(False, "connect_failed"), (True, "answering")]


async def test_cancelling_run_cancels_the_subscription_and_closes_the_socket() -> None:
    simulator = SscSimulator("em6000", port=0, seed=2)
    await simulator.start()
    recorder = Recorder()
    driver = SscDriver(DeviceTarget("127.0.0.1", simulator.port, Family.D6000, "ssc-test"), recorder, FAST)
    task = asyncio.create_task(driver.run())
    try:
        await online(driver, recorder)
        await eventually(lambda: simulator.subscription_count == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: simulator.subscription_count == 0, 1.0)
        await driver.stop()
    finally:
        await simulator.stop()
        await simulator.stop()


async def test_unreachable_device_reports_connect_failed_once() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recorder = Recorder()
    driver = SscDriver(DeviceTarget("127.0.0.1", port, Family.EWDX, "ssc-test"), recorder, FAST)
    task = asyncio.create_task(driver.run())
    await eventually(lambda: recorder.links == [(False, "connect_failed")])
    await asyncio.sleep(0.5)
    assert recorder.links == [(False, "connect_failed")]
    assert driver.device is None and not driver.online
    reply = await driver.execute(DriverCommand(CommandAction.MUTE, channel=1))
    assert reply.outcome is CommandOutcome.DEVICE_OFFLINE
    await driver.stop()
    await driver.stop()
    await asyncio.wait_for(task, 2.0)


async def test_unresolvable_address_is_reported_and_stop_ends_run() -> None:
    recorder = Recorder()
    driver = SscDriver(DeviceTarget("256.0.0.1", 45, Family.D6000, "ssc-test"), recorder, FAST)
    task = asyncio.create_task(driver.run())
    await eventually(lambda: recorder.links == [(False, "connect_failed")])
    await driver.stop()
    await asyncio.wait_for(task, 2.0)
    with pytest.raises(ValueError, match="positive"):
        SscDriver(DeviceTarget("127.0.0.1", 45, Family.EWDX, "k"), recorder, subscription_lifetime_s=0)


# ---- the simulator answers as the device does ----------------------------------------------


class RawClient(asyncio.DatagramProtocol):
    """A bare SSC controller: send a tree, read the next datagram."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait(data)


@asynccontextmanager
async def raw(kind: str = "ewdx-em2") -> AsyncIterator[tuple[SscSimulator, Callable[[Any], Any], list[Any]]]:
    simulator = SscSimulator(kind, port=0, seed=7)
    await simulator.start()
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        RawClient, remote_addr=("127.0.0.1", simulator.port)
    )
    pushes: list[Any] = []
    xids = iter(range(1000, 2000))

    async def ask(request: Any) -> Any:
        """Send ``request``; its reply (matched by xid, which is removed), pushes go to ``pushes``."""
        if isinstance(request, bytes):
            transport.sendto(request)
            return json.loads(await asyncio.wait_for(client.inbox.get(), 1.0))
        osc = request.setdefault("osc", {})
        xid = osc.setdefault("xid", next(xids))
        transport.sendto(json.dumps(request).encode())
        while True:
            reply = json.loads(await asyncio.wait_for(client.inbox.get(), 1.0))
            if reply.get("osc", {}).get("xid") == xid:
                del reply["osc"]["xid"]
                if not reply["osc"]:
                    del reply["osc"]
                return reply
            pushes.append(reply)

    try:
        yield simulator, ask, pushes
    finally:
        transport.close()
        await simulator.stop()


async def test_simulator_fills_queries_and_reports_inline_errors() -> None:
    async with raw() as (simulator, ask, _):
        reply = await ask({"device": {"identity": {"product": None}}, "osc": {"xid": 5}})
        assert reply == {"device": {"identity": {"product": "EW-DX EM 2"}}}
        reply = await ask({"rx9": {"name": None}, "rx1": {"nope": None, "name": None}, "m": {"rx1": None}})
        assert reply["rx1"] == {"name": simulator.channel(1).name}
        codes = {json.dumps(error) for error in reply["osc"]["error"]}
        assert codes == {
            json.dumps({"rx9": [{"desc": "address not found", "code": 404}]}),
            json.dumps({"rx1": {"nope": [{"desc": "parameter address not found", "code": 454}]}}),
            json.dumps({"m": [{"desc": "meters are only available by subscription", "code": 406}]}),
        }
        reply = await ask({"rx1": None, "osc": {"version": None}})
        assert reply["rx1"]["frequency"] == simulator.channel(1).frequency_khz
        assert reply["osc"] == {"version": "1.0"}
        simulator.set_transmitter_on(2, False)
        reply = await ask({"mates": {"tx2": {"name": None}, "tx1": {"name": None}}})
        assert reply["mates"] == {"tx1": {"name": simulator.channel(1).transmitter.name}}
        assert reply["osc"]["error"] == [
            {"mates": {"tx2": [{"desc": "failed dependency: the transmitter is off", "code": 424}]}}
        ]


async def test_simulator_validates_sets() -> None:
    async with raw("em6000") as (simulator, ask, _):
        sets = {"rx1": {"frequency": 500_000, "gain": 6, "mute": True}, "device": {"name": "STAGE-L"}}
        ok = await ask(json.loads(json.dumps(sets)))
        assert ok == sets
        assert simulator.channel(1).muted and simulator.device_name == "STAGE-L"
        bad = await ask(
            {
                "rx1": {"frequency": 500_010, "gain": "6", "mute": 1, "name": "a.b", "warnings": []},
                "rx2": {"name": 5},
                "device": {"name": "has blank", "identification": {"visual": 1}},
                "mates": "x",
            }
        )
        codes = sorted(error_code(error) for error in bad["osc"]["error"])
        assert codes == [400, 400, 400, 400, 400, 406, 406, 406, 406]
        identified = await ask({"device": {"identification": {"visual": True}}})
        assert identified == {"device": {"identification": {"visual": True}}}
        assert simulator.identify_count == 1
        assert (await ask({"device": {"identification": {"visual": None}}}))["device"]["identification"] == {
            "visual": True
        }
        garbage = await ask(b"\xff{")
        assert garbage["osc"]["error"][0]["code"] == 400
        simulator.faults.rep_err = True
        failed = await ask({"device": {"name": None}, "osc": {"xid": "q"}})
        assert failed == {"osc": {"error": [{"device": [{"desc": "internal server error", "code": 500}]}]}}


def error_code(tree: Any) -> int:
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    assert isinstance(tree, list)
    code = tree[0]["code"]
    assert isinstance(code, int)
    return code


async def test_simulator_subscriptions_push_expire_and_cancel() -> None:
    async with raw("ewdx-em4") as (simulator, ask, pushes):
        request = {
            "osc": {
                "state": {
                    "subscribe": [
                        {
                            "#": {"lifetime": 0.3, "min": 20, "count": 1000},
                            "m": {"rx4": {"rsqi": None, "af": None}},
                            "rx1": {"name": None},
                        }
                    ]
                }
            }
        }
        answer = await ask(request)
        subscribed = answer["osc"]["state"]["subscribe"][0]
        assert set(subscribed["m"]["rx4"]) == {"rsqi", "af"}
        assert subscribed["rx1"] == {"name": simulator.channel(1).name}
        assert simulator.subscription_count == 1
        await eventually(lambda: simulator.subscription_count == 0, 1.0)  # the lifetime ended
        await ask({"osc": {"version": None}})  # collects what was pushed meanwhile
        assert 5 <= len(pushes) <= 20  # ~0.3 s at 20 ms, minus scheduling
        assert all(set(push["m"]) == {"rx4"} and set(push["m"]["rx4"]) == {"rsqi", "af"} for push in pushes)
        assert sum("rx1" in push for push in pushes) == 1  # unchanged state is pushed once
        unknown = await ask({"osc": {"ping": None}})
        assert error_code(unknown["osc"]["error"][0]) == 454
        pushes.clear()
        twice = {"#": {"min": 20, "count": 2}, "m": {"rx1": None}}
        counted = await ask({"osc": {"state": {"subscribe": [twice]}}})
        assert "m" in counted["osc"]["state"]["subscribe"][0]
        await eventually(lambda: simulator.subscription_count == 0, 1.0)  # the count ran out
        await ask({"osc": {"version": None}})
        assert len(pushes) == 2
        await ask({"osc": {"state": {"subscribe": [{"#": {"lifetime": 5}, "m": {"rx2": {"af": None}}}]}}})
        await ask({"osc": {"state": {"subscribe": [{"#": {"lifetime": 5}, "m": {"rx2": {"af": None}}}]}}})
        assert simulator.subscription_count == 1  # the same subscription again renews it
        cancelled = await ask({"osc": {"state": {"subscribe": [{"#": {"cancel": True}}]}}})
        assert cancelled["osc"]["state"]["subscribe"] == [{"#": {"cancel": True}}]
        assert simulator.subscription_count == 0
        refused = await ask(
            {
                "osc": {
                    "state": {
                        "subscribe": [
                            {"#": {"lifetime": -1}, "m": {}},
                            {"#": {"min": 1}},
                            {"#": {"count": 0}},
                            5,
                            {"#": {}, "m": {"rx1": {"af": -3}}},
                            {"#": {}, "rx9": {"name": None}},
                        ]
                    }
                }
            }
        )
        assert [error_code(e) for e in refused["osc"]["error"]] == [400, 400, 400, 400, 400, 404]
        not_a_list = await ask({"osc": {"state": {"subscribe": {}}}})
        assert error_code(not_a_list["osc"]["error"][0]) == 400
        assert error_code((await ask(b'{"osc":3}'))["osc"]["error"][0]) == 400


def test_simulator_identity_and_announcement() -> None:
    simulator = SscSimulator("ewdx-em4", port=0, seed=3)
    again = SscSimulator("ewdx-em4", port=0, seed=3)
    assert simulator.serial == again.serial  # deterministic for a seed
    assert [c.name for c in simulator.channels] == [c.name for c in again.channels]
    assert simulator.model == "EW-DX EM 4"
    assert len(simulator.channels) == 4
    announcement = simulator.announcement()
    assert announcement.service_type == SSC_SERVICE_TYPE
    assert announcement.properties == {"product": "EW-DX EM 4"}
    assert announcement.slp_dcid is None
    assert simulator.serial in announcement.instance_name
    with pytest.raises(ValueError, match="unknown SSC simulator kind"):
        SscSimulator("slxd4")
    with pytest.raises(IndexError):
        simulator.channel(5)
    assert SscSimulator("em6000").port == 45
