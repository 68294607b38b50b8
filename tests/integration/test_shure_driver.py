"""The Shure driver against the Shure simulator over real loopback sockets, for every family."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest

from micboard.agent.drivers.base import CommandReply, DeviceTarget, DriverCommand, DriverOptions
from micboard.agent.drivers.shure import SHURE_SIMULATOR_KINDS, ShureDriver, ShureSimulator
from micboard.agent.drivers.shure.driver import REFUSED_REASON, SLXD_MUTE_REASON, UNANSWERED_REASON
from micboard.agent.drivers.shure.protocol import FrameReader, Get, Rep, RepErr, Sample, Set
from micboard.agent.drivers.shure.simulator import MODELS
from micboard.shared.envelope import CommandAction, CommandOutcome
from micboard.shared.model import ChannelMeter, Device, Family, ReceiverChannel, Transmitter

FAST = DriverOptions(
    meter_interval_ms=100,
    silence_timeout_s=0.5,
    connect_timeout_s=0.5,
    command_timeout_s=0.5,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
)
# The default for tests about what the device says, not about how long it takes: on a loaded
# machine a 0.5 s command or silence timeout can fire first and turn an answer into a timeout or
# a reconnect. Tests of the timeouts themselves pass FAST.
PATIENT = DriverOptions(
    meter_interval_ms=100,
    silence_timeout_s=5.0,
    connect_timeout_s=5.0,
    command_timeout_s=5.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
)


@dataclass
class Recorder:
    """A DeviceListener that keeps everything it is told."""

    devices: list[Device] = field(default_factory=list)
    meters: list[ChannelMeter] = field(default_factory=list)
    links: list[tuple[bool, str]] = field(default_factory=list)

    def device_updated(self, device: Device) -> None:
        self.devices.append(device)

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        assert device_key == "rack-1"
        self.meters.extend(meters)

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        self.links.append((online, reason))


# A bound for conditions that must come true, not a measure of speed: it is generous so that a
# loaded machine cannot fail a wait that returns in milliseconds when it is not.
async def until(predicate: Callable[[], object], within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def chan(driver: ShureDriver, index: int) -> ReceiverChannel:
    device = driver.device
    assert device is not None
    channel = device.channel(index)
    assert channel is not None
    return channel


def tx(driver: ShureDriver, index: int) -> Transmitter:
    transmitter = chan(driver, index).transmitter
    assert transmitter is not None
    return transmitter


def scripted_receiver(
    reply: bytes, sample: bytes
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A TCP receiver that answers the driver's first questions with ``reply``, then meters.

    ``sample`` is sent every 50 ms for about five seconds, so the link stays alive meanwhile.
    """

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(reply)
        with contextlib.suppress(OSError):
            for _ in range(100):
                writer.write(sample)
                await asyncio.sleep(0.05)
        writer.close()

    return device


@dataclass
class Rig:
    """A running simulator with one driver connected to it."""

    sim: ShureSimulator
    driver: ShureDriver
    seen: Recorder
    task: asyncio.Task[None]

    @property
    def device(self) -> Device:
        assert self.driver.device is not None
        return self.driver.device


@contextlib.asynccontextmanager
async def running_driver(
    sim: ShureSimulator, options: DriverOptions = PATIENT, port: int | None = None
) -> AsyncIterator[tuple[ShureDriver, Recorder, asyncio.Task[None]]]:
    seen = Recorder()
    target = DeviceTarget("127.0.0.1", sim.port if port is None else port, sim.family, "rack-1")
    driver = ShureDriver(target, seen, options)
    task = asyncio.create_task(driver.run())
    try:
        yield driver, seen, task
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 3.0)


@contextlib.asynccontextmanager
async def rig(kind: str, options: DriverOptions = PATIENT, *, wait_online: bool = True) -> AsyncIterator[Rig]:
    sim = ShureSimulator(kind, port=0, seed=3, activity=0.0)
    await sim.start()
    try:
        async with running_driver(sim, options) as (driver, seen, task):
            if wait_online:
                await until(lambda: driver.online)
            yield Rig(sim, driver, seen, task)
    finally:
        await sim.stop()


FAMILY_KINDS = ["ulxd4", "ulxd4d", "ulxd4q", "qlxd4", "ad4d", "ad4q", "slxd4", "slxd4d"]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
async def test_reads_identity_state_and_live_meters(kind: str) -> None:
    model = MODELS[kind]
    async with rig(kind) as r:
        device = r.device
        assert device.family is model.dialect.family
        assert device.model == (model.reported_model or model.model)
        assert device.device_id == r.sim.device_id
        assert device.firmware == model.firmware
        assert device.channel_count == model.channels
        assert r.seen.links == [(True, "connected")]
        for sim_channel in r.sim.channels:
            channel = device.channel(sim_channel.index)
            assert channel is not None
            assert channel.name == sim_channel.name
            assert channel.frequency_khz == sim_channel.frequency_khz
            assert channel.audio_gain_db == sim_channel.gain - 18
            assert channel.transmitter is not None
            assert channel.transmitter.model == sim_channel.tx_model
            assert channel.transmitter.battery_bars == sim_channel.battery_bars
            assert channel.transmitter.runtime_min == int(sim_channel.battery_min)
            # Every value the family reports, as the simulator wrote it (None where it has none).
            tx = model.dialect.tx
            if model.dialect.group_param in model.dialect.channel_params:
                assert channel.group_channel == sim_channel.group_channel
            assert channel.transmitter.battery_percent == (
                sim_channel.battery_percent if tx.percent else None
            )
            assert channel.transmitter.battery_type == ("LION" if tx.battery_type else None)
            assert channel.transmitter.battery_cycles == (sim_channel.battery_cycles if tx.cycles else None)
            assert channel.transmitter.battery_temp_c == (sim_channel.battery_temp_c if tx.temp_c else None)
            if tx.offset is not None:
                bias = model.dialect.tx_offset_bias_db
                assert channel.transmitter.tx_offset_db == sim_channel.tx_offset_raw - bias
        if "RF_BAND" in model.dialect.device_params:
            assert device.rf_band == model.rf_band
        await until(lambda: {m.index for m in r.seen.meters} == set(range(1, model.channels + 1)))
        meter = r.seen.meters[-1]
        assert len(meter.rf_dbm) == (1 if model.dialect.family is Family.SLXD else model.antennas)
        assert meter.audio_dbfs is not None
        assert r.driver.stats.meters == len(r.seen.meters)
        assert r.driver.stats.parse_errors == 0


@pytest.mark.parametrize("kind", ["ulxd4d", "ad4d", "slxd4"])
async def test_rename_reaches_the_simulator_and_is_confirmed(kind: str) -> None:
    async with rig(kind) as r:
        reply = await r.driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="HH07 Kim"))
        assert reply.outcome is CommandOutcome.OK, reply
        assert r.sim.channel(1).name == "HH07 Kim"
        await until(lambda: chan(r.driver, 1).name == "HH07 Kim")
        width = MODELS[kind].dialect.name_width
        assert Set(1, "CHAN_NAME", None, "HH07 Kim".ljust(width)) in r.sim.received


async def test_invalid_commands_are_rejected_before_sending() -> None:
    async with rig("ulxd4d") as r:
        cases = [
            DriverCommand(CommandAction.RENAME, channel=1, value="much too long"),
            DriverCommand(CommandAction.RENAME, channel=1, value="Zoë"),
            DriverCommand(CommandAction.RENAME, channel=1, value="a{b}"),
            DriverCommand(CommandAction.RENAME, channel=1, value=None),
            DriverCommand(CommandAction.RENAME, channel=1, value="   "),  # would leave it unnamed
            DriverCommand(CommandAction.RENAME, channel=None, value="x"),
            DriverCommand(CommandAction.RENAME, channel=9, value="x"),
            DriverCommand(CommandAction.MUTE, channel=None),
        ]
        for command in cases:
            reply = await r.driver.execute(command)
            assert reply.outcome is CommandOutcome.INVALID, command
            assert reply.detail
        rediscover = await r.driver.execute(DriverCommand(CommandAction.REDISCOVER))
        assert rediscover.outcome is CommandOutcome.NOT_SUPPORTED
        assert not any(isinstance(m, Set) and m.param == "CHAN_NAME" for m in r.sim.received)


@pytest.mark.parametrize(
    ("kind", "supported"), [("ulxd4", True), ("ad4q", True), ("slxd4d", True), ("qlxd4", False)]
)
async def test_identify_flashes_the_front_panel(kind: str, supported: bool) -> None:
    async with rig(kind) as r:
        reply = await r.driver.execute(DriverCommand(CommandAction.IDENTIFY))
        if supported:
            assert reply.outcome is CommandOutcome.OK, reply
            assert r.sim.flash
        else:
            assert reply.outcome is CommandOutcome.NOT_SUPPORTED
            assert not r.sim.flash


@pytest.mark.parametrize(
    ("kind", "supported"), [("ulxd4d", True), ("ad4d", True), ("slxd4", False), ("qlxd4", False)]
)
async def test_mute_only_where_the_family_has_it(kind: str, supported: bool) -> None:
    async with rig(kind) as r:
        reply = await r.driver.execute(DriverCommand(CommandAction.MUTE, channel=1))
        if not supported:
            assert reply.outcome is CommandOutcome.NOT_SUPPORTED
            return
        assert reply.outcome is CommandOutcome.OK, reply
        assert r.sim.channel(1).muted
        await until(lambda: chan(r.driver, 1).muted is True)
        reply = await r.driver.execute(DriverCommand(CommandAction.UNMUTE, channel=1))
        assert reply.outcome is CommandOutcome.OK
        assert not r.sim.channel(1).muted


async def test_commands_to_an_unreachable_device_are_device_offline() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    sim = ShureSimulator("ulxd4", port=0)
    async with running_driver(sim, FAST, port=free_port) as (driver, seen, _task):
        await until(lambda: seen.links)
        assert seen.links == [(False, "connect_failed")]
        reply = await driver.execute(DriverCommand(CommandAction.IDENTIFY))
        assert reply.outcome is CommandOutcome.DEVICE_OFFLINE
        reply = await driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="x"))
        assert reply.outcome is CommandOutcome.DEVICE_OFFLINE
        await asyncio.sleep(0.3)
        assert driver.stats.connects == 0
        assert seen.links == [(False, "connect_failed")]
        assert driver.device is None


async def test_silent_device_is_detected_and_comes_back() -> None:
    async with rig("ad4d", FAST) as r:
        loop = asyncio.get_running_loop()
        r.sim.faults.silent = True
        started = loop.time()
        await until(lambda: not r.driver.online, within_s=2.0)
        assert loop.time() - started < FAST.silence_timeout_s + 0.3
        assert r.seen.links[-1] == (False, "silent")
        reply = await r.driver.execute(DriverCommand(CommandAction.IDENTIFY))
        assert reply.outcome is CommandOutcome.DEVICE_OFFLINE
        r.sim.faults.silent = False
        await until(lambda: r.driver.online, within_s=3.0)
        assert r.seen.links[-1] == (True, "connected")
        assert r.driver.stats.reconnects >= 1


async def test_reconnects_after_the_device_drops_connections() -> None:
    async with rig("ulxd4q") as r:
        await asyncio.sleep(1.1)  # a stable session: the reconnect is immediate
        await r.sim.drop_connections()
        await until(lambda: r.driver.stats.reconnects >= 1 and r.sim.controller_count == 1)
        await until(lambda: r.driver.online)
        before = len(r.seen.meters)
        await until(lambda: len(r.seen.meters) > before + 4)
        reply = await r.driver.execute(DriverCommand(CommandAction.RENAME, channel=4, value="Back"))
        assert reply.outcome is CommandOutcome.OK


async def test_a_receiver_swapped_at_the_same_address_is_reported_as_it_is_now() -> None:
    quad = ShureSimulator("ulxd4q", port=0, seed=3, activity=0.0)
    await quad.start()
    dual = ShureSimulator("ulxd4d", port=quad.port, seed=5, activity=0.0)
    try:
        async with running_driver(quad, FAST) as (driver, seen, _task):
            await until(lambda: driver.online)
            assert driver.device is not None and len(driver.device.channels) == 4
            await quad.stop()
            await dual.start()  # a dual receiver in its place
            await until(lambda: driver.device is not None and driver.device.model == "ULXD4D")
            device = driver.device
            assert [c.index for c in device.channels] == [1, 2]
            assert device.device_id == dual.device_id
            # Once the dual answered, nothing of the quad's channels 3 and 4 was reported.
            swapped = [i for i, d in enumerate(seen.devices) if d.device_id == dual.device_id]
            assert all(len(d.channels) == 2 for d in seen.devices[swapped[0] :])
    finally:
        await dual.stop()
        await quad.stop()


async def test_a_device_that_hangs_up_at_once_is_retried_with_backoff() -> None:
    async with rig("slxd4") as r:
        for _ in range(3):
            await r.sim.drop_connections()
            await until(lambda: r.sim.controller_count == 1)
        await until(lambda: r.driver.online)
        assert r.driver.stats.reconnects >= 3


async def test_garbage_between_messages_does_not_break_the_driver() -> None:
    async with rig("ulxd4d") as r:
        r.sim.faults.garbage = True
        r.sim.set_battery(1, bars=2)
        await until(lambda: tx(r.driver, 1).battery_bars == 2)
        reply = await r.driver.execute(DriverCommand(CommandAction.RENAME, channel=2, value="Noisy"))
        assert reply.outcome is CommandOutcome.OK
        await asyncio.sleep(0.3)
        assert r.driver.stats.dropped_bytes > 0
        assert r.driver.online
        assert chan(r.driver, 2).name == "Noisy"


async def test_rep_err_fails_commands_and_is_counted() -> None:
    async with rig("ad4q", PATIENT) as r:
        # The fault may also hit the metering SETs the driver sends on connect, if the simulator
        # has not read them yet: their REP ERRs must be matched to them, not to the renames.
        r.sim.faults.rep_err = True
        reply = await r.driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="Nope"))
        assert reply == CommandReply(CommandOutcome.FAILED, "device answered REP ERR")
        assert r.driver.stats.device_errors >= 1
        assert r.sim.channel(1).name != "Nope"
        r.sim.faults.rep_err = False
        reply = await r.driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="Yes"))
        assert reply.outcome is CommandOutcome.OK, reply


async def test_a_rep_err_fails_only_the_request_it_answers() -> None:
    # The race behind a flaky REP ERR test, made deterministic: the full read reports
    # METER_RATE 00000 in the same bytes that make the driver ask for metering; the device
    # refuses that SET, but only once the first rename has been sent, and answers the rename
    # (with REP ERR) a little later. The metering SET's REP ERR must not fail the first rename,
    # and the first rename's REP ERR must not fail the second.
    renames: list[str] = []

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader()
        held = b""
        while data := await reader.read(4096):
            for message in frames.feed(data):
                if isinstance(message, Get) and message.channel == 0:
                    writer.write(b"< REP 1 CHAN_NAME {One     } >< REP 1 METER_RATE 00000 >")
                elif isinstance(message, Get):
                    writer.write(b"< REP ERR >")  # identity: this device tells nothing
                elif isinstance(message, Set) and message.param == "METER_RATE":
                    held += b"< REP ERR >"
                elif isinstance(message, Set) and message.param == "CHAN_NAME":
                    renames.append(message.value.rstrip())
                    if len(renames) == 1:
                        writer.write(held)
                        await asyncio.sleep(0.2)
                        writer.write(b"< REP ERR >")
                    else:
                        writer.write(f"< REP 1 CHAN_NAME {{{message.value}}} >".encode("ascii"))
        writer.close()

    server = await asyncio.start_server(device, "127.0.0.1", 0)
    sim = ShureSimulator("ulxd4", port=server.sockets[0].getsockname()[1])
    try:
        async with running_driver(sim, PATIENT) as (driver, _seen, _task):
            await until(lambda: driver.online)
            first = await driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="Nope"))
            assert first == CommandReply(CommandOutcome.FAILED, "device answered REP ERR")
            second = await driver.execute(DriverCommand(CommandAction.RENAME, channel=1, value="Yes"))
            assert second == CommandReply(CommandOutcome.OK)
            assert renames == ["Nope", "Yes"]
            assert driver.stats.device_errors == 3 + 1 + 1  # identity, metering, first rename
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_device_times_out_commands() -> None:
    # Meters keep flowing while answers are late; a silence timeout as short as the command's
    # could still win the race on a loaded machine (a stalled loop looks like a silent device).
    async with rig("ulxd4", replace(FAST, silence_timeout_s=5.0)) as r:
        r.sim.faults.delay_s = 0.8
        reply = await r.driver.execute(DriverCommand(CommandAction.MUTE, channel=1))
        assert reply.outcome is CommandOutcome.FAILED
        assert reply.detail is not None and "confirmation" in reply.detail
        r.sim.faults.delay_s = 0.0


async def test_a_receiver_refusing_control_is_offline_with_the_reason_until_allowed() -> None:
    # An SLX-D before "Allow Third-Party Controls" answers REP ERR to everything: offline with
    # what the installer must do, not online with no channels; retried until control is allowed.
    sim = ShureSimulator("slxd4d", port=0, activity=0.0)
    sim.faults.rep_err = True
    await sim.start()
    try:
        async with running_driver(sim) as (driver, seen, _task):
            await until(lambda: driver.stats.connects >= 2)
            assert seen.links == [(False, REFUSED_REASON)]
            assert "Allow Third-Party Controls" in REFUSED_REASON
            assert not driver.online and seen.devices == []
            assert driver.stats.device_errors >= 2
            sim.faults.rep_err = False  # the installer ticks the box
            await until(lambda: driver.online)
            assert seen.links[-1] == (True, "connected")
            assert len(seen.devices[-1].channels) == 2
    finally:
        await sim.stop()


async def test_a_receiver_back_from_a_silence_is_reported_whole_not_from_its_pushed_values() -> None:
    # The driver reconnects into the silence; the receiver drops those questions and, once back,
    # only pushes what changes (a battery). Reporting that as the receiver's full state blanked
    # every channel's name and frequency: the questions are asked again instead.
    sim = ShureSimulator("ulxd4d", port=0, seed=41, time_scale=600, activity=0.0)
    await sim.start()
    options = replace(FAST, silence_timeout_s=1.0, command_timeout_s=1.0)
    try:
        async with running_driver(sim, options) as (driver, seen, _task):
            await until(lambda: driver.online)
            expected = [(c.index, c.name, c.frequency_khz) for c in sim.channels]
            sim.faults.silent = True
            await until(lambda: driver.stats.connects >= 3, within_s=15.0)  # reconnected into it
            sim.faults.silent = False
            await until(lambda: seen.links[-1] == (True, "connected"), within_s=15.0)
            await asyncio.sleep(options.command_timeout_s)  # what a lying snapshot would follow
            for device in seen.devices[-3:]:
                assert [(c.index, c.name, c.frequency_khz) for c in device.channels] == expected
    finally:
        await sim.stop()


async def test_a_receiver_that_pushes_values_but_answers_nothing_is_not_reported() -> None:
    async def pusher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for _ in range(60):  # a battery level now and then, never an answer
                writer.write(b"< REP 1 BATT_BARS 004 >")
                await writer.drain()
                await asyncio.sleep(0.1)
        writer.close()

    server = await asyncio.start_server(pusher, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen = Recorder()
    options = replace(FAST, silence_timeout_s=5.0, command_timeout_s=0.3)
    driver = ShureDriver(DeviceTarget("127.0.0.1", port, Family.ULXD, "pusher"), seen, options)
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: bool(seen.links))
        assert seen.links[0] == (False, UNANSWERED_REASON)
        assert seen.devices == []
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 3.0)
        server.close()
        await server.wait_closed()


async def test_an_slxd_that_never_answers_is_offline_with_the_setting_to_check() -> None:
    # The other way an SLX-D refuses third-party control: it accepts the connection and says
    # nothing. The reason names the setting; a ULX-D doing the same is plainly silent.
    for kind, reason in (("slxd4d", SLXD_MUTE_REASON), ("ulxd4", "silent")):
        sim = ShureSimulator(kind, port=0, activity=0.0)
        sim.faults.silent = True
        await sim.start()
        try:
            async with running_driver(sim, FAST) as (driver, seen, _task):
                await until(lambda: bool(seen.links))
                assert seen.links[0] == (False, reason)
                assert not driver.online and seen.devices == []
        finally:
            await sim.stop()
    assert "Allow Third-Party Controls" in SLXD_MUTE_REASON


async def test_a_device_with_rep_err_to_one_identity_question_still_comes_online() -> None:
    # GET 0 ALL answered in full, one identity GET refused: online, with what the device said.
    device = scripted_receiver(
        b"< REP 1 CHAN_NAME {Vox     } >< REP MODEL {ULXD4                          } >" + b"< REP ERR >" * 4,
        b"< SAMPLE 1 ALL AX 078 032 >",
    )
    server = await asyncio.start_server(device, "127.0.0.1", 0)
    sim = ShureSimulator("ulxd4", port=server.sockets[0].getsockname()[1])
    try:
        async with running_driver(sim) as (driver, seen, _task):
            await until(lambda: driver.online)
            assert seen.devices[-1].channels[0].name == "Vox"
            assert seen.links == [(True, "connected")]
    finally:
        server.close()
        await server.wait_closed()


async def test_values_longer_than_the_model_holds_are_cut_and_the_device_still_reports() -> None:
    # A receiver reporting a model, transmitter model, group or battery type over 128
    # characters: the driver shows them cut, and keeps reporting the device.
    channel_params = ("TX_MODEL", "GROUP_CHANNEL", "TX_BATT_TYPE")
    long = {param: (param + " ").ljust(300, "x") for param in ("MODEL", *channel_params)}

    device = scripted_receiver(
        b"< REP 1 CHAN_NAME {Lead Vox} >"
        + b"".join(f"< REP 1 {p} {{{long[p]}}} >".encode() for p in channel_params)
        + f"< REP MODEL {{{long['MODEL']}}} >".encode()
        + b"< REP FW_VER {2.4.6} >< REP DEVICE_ID {RACK-LONG} >< REP RF_BAND {G57} >"
        + b"< REP ENCRYPTION_MODE OFF >",
        b"< SAMPLE 1 ALL 005 031 102 102 BB 31 086 31 065 >",
    )

    server = await asyncio.start_server(device, "127.0.0.1", 0)
    sim = ShureSimulator("ad4d", port=server.sockets[0].getsockname()[1])
    try:
        async with running_driver(sim) as (driver, seen, _task):
            await until(lambda: driver.online and bool(seen.devices))
            reported = seen.devices[-1]
            assert reported.model == long["MODEL"][:128]
            assert reported.device_id == "RACK-LONG"
            channel = reported.channels[0]
            assert channel.name == "Lead Vox"
            assert channel.group_channel == long["GROUP_CHANNEL"][:128]
            assert channel.transmitter is not None
            assert channel.transmitter.model == long["TX_MODEL"][:128]
            assert channel.transmitter.battery_type == long["TX_BATT_TYPE"][:128]
    finally:
        server.close()
        await server.wait_closed()


async def test_two_controllers_both_receive_pushed_changes() -> None:
    async with rig("ulxd4d") as r, running_driver(r.sim) as (other, other_seen, _task):
        await until(lambda: other.online)
        assert r.sim.controller_count == 2
        r.sim.set_battery(2, minutes=42)
        r.sim.set_transmitter_on(1, False)
        r.sim.set_name(2, "Panel")
        for driver in (r.driver, other):
            await until(lambda: chan(driver, 1).transmitter is None)  # noqa: B023 - awaited in the loop
            await until(lambda: tx(driver, 2).runtime_min == 42)  # noqa: B023
            await until(lambda: chan(driver, 2).name == "Panel")  # noqa: B023
        # A rename by one controller reaches the other as an unsolicited REP.
        reply = await other.execute(DriverCommand(CommandAction.RENAME, channel=1, value="Both"))
        assert reply.outcome is CommandOutcome.OK
        await until(lambda: chan(r.driver, 1).name == "Both")
        r.sim.set_transmitter_on(1, True)
        await until(lambda: chan(r.driver, 1).transmitter is not None)
        assert other_seen.links == [(True, "connected")]


async def test_polite_stop_switches_metering_off_for_every_channel() -> None:
    async with rig("ad4q") as r:
        await r.driver.stop()
        await asyncio.wait_for(r.task, 2.0)
        await until(lambda: r.sim.controller_count == 0)
        for n in range(1, 5):
            assert Set(n, "METER_RATE", None, "00100") in r.sim.received
            assert Set(n, "METER_RATE", None, "00000") in r.sim.received
        assert not r.driver.online
        await r.driver.stop()  # twice is fine


async def test_cancelled_driver_still_switches_metering_off() -> None:
    sim = ShureSimulator("ulxd4d", port=0, activity=0.0)
    await sim.start()
    try:
        seen = Recorder()
        driver = ShureDriver(DeviceTarget("127.0.0.1", sim.port, Family.ULXD, "rack-1"), seen, PATIENT)
        task = asyncio.create_task(driver.run())
        await until(lambda: driver.online)
        task.cancel()
        # Bounded: a cancellation the driver loses (asyncio.wait_for on Python 3.11 can drop one
        # that arrives together with a SAMPLE) must fail here, not hang the run.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        assert task.cancelled()
        await until(lambda: Set(2, "METER_RATE", None, "00000") in sim.received)
    finally:
        await sim.stop()


async def test_a_quiet_device_is_probed_not_dropped() -> None:
    # The probe is sent after half the silence timeout and must be answered in the other half:
    # 1 s leaves a loaded machine room for that; 2.5 s of quiet still spans two timeouts.
    quiet = DriverOptions(
        meter_interval_ms=0,
        silence_timeout_s=1.0,
        connect_timeout_s=0.5,
        command_timeout_s=0.5,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    async with rig("qlxd4", quiet) as r:
        await asyncio.sleep(2.5)
        assert r.driver.online
        assert r.seen.links == [(True, "connected")]
        assert r.seen.meters == []


async def test_driver_refuses_a_family_it_does_not_speak_and_a_second_run() -> None:
    with pytest.raises(ValueError, match="does not speak"):
        ShureDriver(DeviceTarget("127.0.0.1", 1, Family.EWDX, "x"), Recorder())
    async with rig("ulxd4") as r:
        with pytest.raises(RuntimeError):
            await r.driver.run()


# -- the simulator on its own: exact answers over a raw socket ----------------------------


async def exchange(sim: ShureSimulator, request: bytes, replies: int) -> list[object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    frames = FrameReader()
    got: list[object] = []
    try:
        writer.write(request)
        while len(got) < replies:
            data = await asyncio.wait_for(reader.read(4096), 2.0)
            assert data
            got.extend(frames.feed(data))
    finally:
        writer.close()
        await writer.wait_closed()
    return got


async def test_simulator_answers_like_the_hardware() -> None:
    sim = SHURE_SIMULATOR_KINDS["ulxd4d"](port=0, seed=3, activity=0.0)
    await sim.start()
    try:
        got = await exchange(
            sim,
            b"< GET 1 CHAN_NAME >< GET 2 FREQUENCY >< GET MODEL >< GET 3 CHAN_NAME >"
            b"< GET DEVICE_ID >< GET 0 AUDIO_GAIN >< SET 1 AUDIO_GAIN 020 >< SET 1 METER_RATE 00050 >"
            b"< GET 1 METER_RATE >< SET 1 AUDIO_MUTE TOGGLE >< SET 1 FREQUENCY 470150 >< BOGUS 1 X >"
            b"< SET 1 METER_RATE 65536 >",
            14,
        )
        name = sim.channel(1).name.ljust(8)
        assert got == [
            Rep(1, "CHAN_NAME", None, name),
            Rep(2, "FREQUENCY", None, f"{sim.channel(2).frequency_khz:06d}"),
            RepErr(),
            RepErr(),
            Rep(None, "DEVICE_ID", None, sim.device_id.ljust(8)),
            Rep(1, "AUDIO_GAIN", None, "018"),
            Rep(2, "AUDIO_GAIN", None, "018"),
            Rep(1, "AUDIO_GAIN", None, "020"),
            RepErr(),
            Rep(1, "METER_RATE", None, "00000"),
            Rep(1, "AUDIO_MUTE", None, "ON"),
            Rep(1, "FREQUENCY", None, "470150"),
            RepErr(),
            RepErr(),  # 00100..65535 ms, or 00000
        ]
    finally:
        await sim.stop()


async def test_simulator_meters_at_the_requested_rate_and_answers_rssi() -> None:
    sim = ShureSimulator("ad4q", port=0, seed=5, activity=0.0)
    await sim.start()
    try:
        got = await exchange(sim, b"< GET 2 RSSI 3 >< GET 2 RSSI 9 >< SET 2 METER_RATE 00100 >", 8)
        assert isinstance(got[0], Rep)
        assert (got[0].channel, got[0].param, got[0].position) == (2, "RSSI", 3)
        assert got[1] == RepErr()
        assert got[2] == Rep(2, "METER_RATE", None, "00100")
        samples = [m for m in got[3:] if isinstance(m, Sample)]
        assert samples and all(s.channel == 2 and len(s.fields) == 13 for s in samples)
        sim.set_transmitter_on(2, False)
        tx_off = sim._sample(sim.channel(2))
        assert tx_off.startswith(b"< SAMPLE 2 ALL 255 000 005 033 XXXX 00 ")
        announcement = sim.announcement()
        assert announcement.service_type == "_shure._tcp.local."
        assert announcement.properties == {"model": "AD4Q"}
        assert announcement.slp_dcid == "042D5A00-FD5A-11E3-A553-0015C5F3F612"
        assert announcement.port == sim.port
    finally:
        await sim.stop()
        await sim.stop()


def test_simulator_kinds_and_defaults() -> None:
    assert set(SHURE_SIMULATOR_KINDS) == set(FAMILY_KINDS)
    assert ShureSimulator("slxd4", index=3).port == 2205
    assert ShureSimulator("slxd4").announcement().slp_dcid is None
    assert ShureSimulator("qlxd4").announcement().slp_dcid == "0405BFCC-FD5A-11E3-BEEE-0015C5F3F612"
    with pytest.raises(ValueError, match="unknown Shure simulator kind"):
        ShureSimulator("ur4d")


def test_simulated_world_is_deterministic_and_batteries_drain() -> None:
    one = ShureSimulator("ulxd4q", seed=11, time_scale=600.0)
    two = ShureSimulator("ulxd4q", seed=11, time_scale=600.0)
    before = [c.battery_min for c in one.channels]
    for _ in range(50):
        one.advance(0.1)
        two.advance(0.1)
    assert [c.battery_min for c in one.channels] == [c.battery_min for c in two.channels]
    assert [c.rf_dbm for c in one.channels] == [c.rf_dbm for c in two.channels]
    # 5 s at 600x is 50 minutes of battery.
    assert all(b - c.battery_min == pytest.approx(50.0) for b, c in zip(before, one.channels, strict=True))
    one.set_battery(1, minutes=1.0)
    one.advance(1.0)
    assert not one.channel(1).tx_on
    assert one.channel(1).battery_bars == 0


async def test_a_pending_command_fails_when_the_link_drops() -> None:
    async with rig("ulxd4") as r:
        r.sim.faults.delay_s = 0.3
        pending = asyncio.create_task(r.driver.execute(DriverCommand(CommandAction.IDENTIFY)))
        await asyncio.sleep(0.1)
        await r.sim.drop_connections()
        reply = await pending
        assert reply.outcome is CommandOutcome.FAILED
        assert reply.detail == "connection closed"


async def test_odd_device_output_is_counted_and_identity_gaps_do_not_block() -> None:
    # A receiver that never answers the identity GETs and says odd things: the driver reads
    # what it can, goes online after command_timeout_s and counts the rest.
    async def odd_device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(
            b"< REP 1 CHAN_NAME {Odd     } >< REP 99 CHAN_NAME {x} >< SAMPLE 1 ALL AX 999 032 >"
            b"< GET 1 CHAN_NAME >< REP SLOT_THING 2 X >< REP 0 AUDIO_GAIN 018 >"
        )
        with contextlib.suppress(OSError):
            for _ in range(100):
                writer.write(b"< SAMPLE 1 ALL AX 078 032 >")
                await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(odd_device, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sim = ShureSimulator("ulxd4", port=port)
    try:
        async with running_driver(sim, FAST) as (driver, seen, _task):
            await until(lambda: driver.online)
            assert seen.devices[-1].channels[0].name == "Odd"
            assert seen.devices[-1].model == "ULXD4"
            assert driver.stats.parse_errors == 3
            await until(lambda: len(seen.meters) > 2)
    finally:
        server.close()
        await server.wait_closed()


async def test_simulator_refuses_what_the_hardware_refuses() -> None:
    sim = ShureSimulator("ulxd4d", port=0, activity=0.0)
    await sim.start()
    await sim.start()  # already serving: nothing happens
    try:
        requests = [
            b"< GET 1 BOGUS >",
            b"< GET 1 CHAN_NAME 2 >",
            b"< GET FLASH 2 >",
            b"< GET 1 RSSI 1 >",
            b"< SET MODEL X >",
            b"< SET 5 CHAN_NAME {x} >",
            b"< SET 1 CHAN_NAME {123456789} >",
            b"< SET 1 FREQUENCY 400000 >",
            b"< SET 1 TX_TYPE ULXD1 >",
            b"< SET 1 CHAN_NAME 2 {x} >",
            b"< SET 1 AUDIO_GAIN 099 >",
            b"< SET 1 METER_RATE 100 >",
            b"< SAMPLE 1 ALL AX 078 032 >",
        ]
        got = await exchange(sim, b"".join(requests), len(requests))
        assert got == [RepErr()] * len(requests)
        got = await exchange(sim, b"< SET FLASH ON >< SET 0 METER_RATE 00100 >< SET 0 METER_RATE 00000 >", 5)
        assert got == [
            Rep(None, "FLASH", None, "ON"),
            Rep(1, "METER_RATE", None, "00100"),
            Rep(2, "METER_RATE", None, "00100"),
            Rep(1, "METER_RATE", None, "00000"),
            Rep(2, "METER_RATE", None, "00000"),
        ]
        sim._flash_until = 0.0
        await until(lambda: not sim.flash)
        assert sim.model == "ULXD4D"
    finally:
        await sim.stop()


def test_simulator_random_events_and_test_controls() -> None:
    sim = ShureSimulator("ad4q", seed=2, activity=2000.0)
    for _ in range(200):
        sim.advance(0.1)
    assert any(not c.tx_on for c in sim.channels) or any(c.interference for c in sim.channels)
    calm = ShureSimulator("ulxd4", seed=2, activity=0.0)
    calm.set_interference(1, True)
    assert calm._channel_value(calm.channel(1), "RF_INT_DET") == "CRITICAL"
    calm.set_rf(1, -80.0)
    assert calm.channel(1).rf_dbm == -80.0
    assert b" XX " not in calm._sample(calm.channel(1))
    calm.set_transmitter_on(1, False)
    assert calm._sample(calm.channel(1)).startswith(b"< SAMPLE 1 ALL XX ")
    slx = ShureSimulator("slxd4", seed=2, activity=0.0)
    slx.set_transmitter_on(1, False)
    assert slx._sample(slx.channel(1)).startswith(b"< SAMPLE 1 ALL 000 000 ")


async def test_a_device_that_accepts_and_hangs_up_is_offline() -> None:
    async def rude_device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(rude_device, "127.0.0.1", 0)
    sim = ShureSimulator("ulxd4", port=server.sockets[0].getsockname()[1])
    try:
        async with running_driver(sim) as (driver, seen, _task):
            await until(lambda: driver.stats.connects >= 3)
            assert seen.links == [(False, "connect_failed")]
            assert not driver.online
    finally:
        server.close()
        await server.wait_closed()


# -- reconnect backoff and bad input ----------------------------------------------------

# A ULX-D that answers GET 0 ALL and every identity question at once: the driver syncs on it.
ULXD_REPLY = (
    b"< REP 1 CHAN_NAME {Vox     } >< REP FW_VER {2.0.1} >< REP DEVICE_ID {RACK} >< REP ENCRYPTION OFF >"
)
ULXD_SAMPLE = b"< SAMPLE 1 ALL AX 078 032 >"


@dataclass
class Connections:
    """When a test receiver accepted each connection, and when each healthy one was hung up."""

    accepted: list[float] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def receiver_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[ShureSimulator]:
    """A TCP server running ``handler``; yields a ULX-D simulator (not started) naming its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield ShureSimulator("ulxd4", port=server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_the_backoff_starts_over_after_every_healthy_session() -> None:
    # Every second connection is healthy (read in full, metered for longer than a stable
    # session) and then falls silent; the others are hung up at once. After each healthy session
    # the driver reconnects at once and the failure after it waits the initial backoff again:
    # one backoff kept for the whole run waited 0.3, 0.6, 1.2, 2.4 s ... instead.
    options = replace(PATIENT, silence_timeout_s=0.5, backoff_initial_s=0.3, backoff_max_s=5.0)
    loop = asyncio.get_running_loop()
    seen = Connections()

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        healthy = len(seen.accepted) % 2 == 0
        seen.accepted.append(loop.time())
        if not healthy:
            writer.close()
            return
        await reader.read(4096)
        writer.write(ULXD_REPLY)
        with contextlib.suppress(OSError):
            for _ in range(24):  # 1.2 s of meters: longer than a stable session
                writer.write(ULXD_SAMPLE)
                await asyncio.sleep(0.05)
            while await reader.read(4096):  # silent (probes unanswered) until the driver hangs up
                pass
        seen.ended.append(loop.time())
        writer.close()

    async with receiver_server(device) as sim, running_driver(sim, options) as (driver, links, _task):
        await until(lambda: len(seen.accepted) >= 5)
        assert driver.stats.connects >= 5
        assert links.links[:2] == [(True, "connected"), (False, "silent")]
    accepted, ended = seen.accepted, seen.ended
    for k in (0, 1):
        # Healthy session k ended: the next connection is at once, not after a wait.
        assert accepted[2 * k + 1] - ended[k] < 0.25, (accepted, ended)
        # The failure after it: the initial wait (0.3 s plus up to 0.3 s of jitter), every time.
        assert 0.29 <= accepted[2 * k + 2] - accepted[2 * k + 1] < 0.9, (accepted, ended)


async def test_the_backoff_grows_while_the_device_stays_unusable_and_is_capped() -> None:
    # A receiver that hangs up every connection at once is never read in full: each failure
    # waits twice as long as the one before, 0.05 s up to the cap of 0.4 s, jitter included.
    options = replace(PATIENT, backoff_initial_s=0.05, backoff_max_s=0.4)
    loop = asyncio.get_running_loop()
    accepted: list[float] = []

    async def rude_device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(loop.time())
        writer.close()

    async with receiver_server(rude_device) as sim, running_driver(sim, options) as (driver, seen, _task):
        await until(lambda: len(accepted) >= 8)
        assert seen.links == [(False, "connect_failed")]
        assert not driver.online
    waits = [later - earlier for earlier, later in itertools.pairwise(accepted)][:7]
    for attempt, wait in enumerate(waits):
        # The exponential part is capped at the cap less the jitter, so that jitter stays.
        least = min(0.05 * 2**attempt, 0.4 - 0.05)
        assert least - 0.01 <= wait <= least + 0.05 + 0.25, (attempt, waits)
    assert max(waits) <= 0.4 + 0.25, waits  # capped: uncapped, the last would wait 3.2 s


async def test_bad_input_is_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    # The parser only counts junk; the driver says so in the log, throttled.
    caplog.set_level(logging.DEBUG, logger="micboard.agent.drivers.shure.driver")
    device = scripted_receiver(ULXD_REPLY, b"junk without a start >" + ULXD_SAMPLE)
    async with receiver_server(device) as sim, running_driver(sim) as (driver, seen, _task):
        await until(lambda: driver.online and driver.stats.parse_errors >= 5 and len(seen.meters) >= 5)
    logged = [r for r in caplog.records if r.getMessage() == "shure bad input skipped"]
    assert len(logged) == 1, logged  # five bad lines and more, one line in the log
    record = logged[0]
    assert record.levelno == logging.DEBUG
    assert record.__dict__["device_key"] == "rack-1"
    assert record.__dict__["bad_messages"] >= 1 and record.__dict__["dropped_bytes"] > 0
