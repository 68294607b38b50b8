"""A simulated Shure receiver on TCP that answers command strings as the hardware does.

Many controllers may connect at once; every value change is pushed as ``REP`` to all of them,
and each gets ``SAMPLE`` lines at the ``METER_RATE`` it asked for. Batteries drain, RF fades,
diversity switches and transmitters go off and on, deterministically for a given seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from micboard.shared.model import Family, Vendor

from ..simulation import Announcement, ReceiverSimulator
from .dialects import AXIENT, QLXD, SLXD, ULXD, Dialect
from .protocol import FrameReader, Get, Message, Set

logger = logging.getLogger(__name__)

DEFAULT_PORT = 2202
_TICK_S = 0.1
_IDLE_TIMEOUT_S = 600.0
# A controller that does not read is dropped rather than buffered without bound.
_MAX_WRITE_BUFFER = 1024 * 1024
_FLASH_S = 10.0
_BATTERY_CAPACITY_MIN = 600.0
_RECEIVED_KEPT = 2000
# How long stop() and drop_connections() wait for a cancelled task to end: shutdown is bounded
# even if a task misbehaves, so a test or demo that stops the simulator cannot hang on it.
_CLOSE_TIMEOUT_S = 5.0

DCID_ULXD_SINGLE = "040688F8-FD5A-11E3-81EF-0015C5F3F612"
DCID_ULXD_DUAL = "0406C584-FD5A-11E3-AD62-0015C5F3F612"
DCID_ULXD_QUAD = "0407257E-FD5A-11E3-A21F-0015C5F3F612"
DCID_QLXD = "0405BFCC-FD5A-11E3-BEEE-0015C5F3F612"
DCID_AD4D = "042D1C02-FD5A-11E3-B298-0015C5F3F612"
DCID_AD4Q = "042D5A00-FD5A-11E3-A553-0015C5F3F612"


@dataclass(frozen=True, slots=True)
class SimulatedModel:
    """A receiver model the simulator can be: what it reports and how it is announced."""

    kind: str
    model: str
    reported_model: str | None
    dialect: Dialect
    channels: int
    antennas: int
    dcid: str | None
    tx_models: tuple[str, ...]
    rf_band: str
    firmware: str
    band_khz: tuple[int, int]


MODELS: dict[str, SimulatedModel] = {
    m.kind: m
    for m in (
        SimulatedModel(
            "ulxd4",
            "ULXD4",
            None,
            ULXD,
            1,
            2,
            DCID_ULXD_SINGLE,
            ("ULXD2", "ULXD1"),
            "G50",
            "2.7.6.0",
            (470_125, 533_875),
        ),
        SimulatedModel(
            "ulxd4d",
            "ULXD4D",
            None,
            ULXD,
            2,
            2,
            DCID_ULXD_DUAL,
            ("ULXD2", "ULXD1"),
            "G50",
            "2.7.6.0",
            (470_125, 533_875),
        ),
        SimulatedModel(
            "ulxd4q",
            "ULXD4Q",
            None,
            ULXD,
            4,
            2,
            DCID_ULXD_QUAD,
            ("ULXD2", "ULXD1"),
            "G50",
            "2.7.6.0",
            (470_125, 533_875),
        ),
        SimulatedModel(
            "qlxd4",
            "QLXD4",
            None,
            QLXD,
            1,
            2,
            DCID_QLXD,
            ("QLXD2", "QLXD1"),
            "G50",
            "2.2.11.0",
            (470_125, 533_875),
        ),
        SimulatedModel(
            "ad4d",
            "AD4D",
            "AD4D-A",
            AXIENT,
            2,
            2,
            DCID_AD4D,
            ("AD2", "AD1", "ADX1"),
            "G57",
            "1.6.11.0",
            (470_125, 615_825),
        ),
        SimulatedModel(
            "ad4q",
            "AD4Q",
            "AD4Q-A",
            AXIENT,
            4,
            4,
            DCID_AD4Q,
            ("AD2", "AD1", "ADX2"),
            "G57",
            "1.6.11.0",
            (470_125, 615_825),
        ),
        SimulatedModel(
            "slxd4",
            "SLXD4",
            "SLXD4",
            SLXD,
            1,
            2,
            None,
            ("SLXD2", "SLXD1"),
            "G58",
            "2.0.38.9",
            (470_125, 513_875),
        ),
        SimulatedModel(
            "slxd4d",
            "SLXD4D",
            "SLXD4D",
            SLXD,
            2,
            2,
            None,
            ("SLXD2", "SLXD1"),
            "G58",
            "2.0.38.9",
            (470_125, 513_875),
        ),
    )
}

_PEOPLE = ("Fatai", "Ana", "Mei", "Omar", "Lena", "Raj", "Zoe", "Ivo")
_SHORT_PEOPLE = ("Tom", "Ana", "Mei", "Ali", "Eva", "Raj", "Zoe", "Ivo")


@dataclass(slots=True)
class _Channel:
    """The simulated state of one receive channel and its transmitter."""

    index: int
    name: str
    frequency_khz: int
    group_channel: str
    gain: int = 18
    muted: bool = False
    interference: bool = False
    tx_on: bool = True
    tx_model: str = "UNKNOWN"
    battery_min: float = _BATTERY_CAPACITY_MIN
    battery_cycles: int = 12
    battery_health: int = 96
    battery_temp_c: int = 24
    tx_offset_raw: int = 0
    tx_muted: bool = False
    base_rf_dbm: float = -55.0
    rf_dbm: float = -55.0
    fade_db: float = 0.0
    active_antenna: int = 0
    audio_dbfs: float = -30.0
    talk: float = 0.5

    @property
    def battery_percent(self) -> int:
        return max(0, min(100, round(100.0 * self.battery_min / _BATTERY_CAPACITY_MIN)))

    @property
    def battery_bars(self) -> int:
        return min(5, math.ceil(self.battery_percent / 20))


@dataclass(slots=True, eq=False)
class _Controller:
    """One connected controller: its socket, its meter rates and its metering task."""

    writer: asyncio.StreamWriter
    rates_ms: dict[int, int] = field(default_factory=dict)
    next_due: dict[int, float] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    meter_task: asyncio.Task[None] | None = None


class ShureSimulator(ReceiverSimulator):
    """A simulated ULX-D / QLX-D / Axient Digital / SLX-D receiver speaking TCP 2202.

    ``activity`` scales random events (transmitters off/on, RF drop-outs, interference):
    0 leaves only continuous processes and what tests drive through the ``set_*`` methods.
    """

    vendor = Vendor.SHURE

    def __init__(
        self,
        kind: str = "ulxd4d",
        *,
        index: int = 0,
        host: str = "127.0.0.1",
        port: int | None = None,
        seed: int = 0,
        time_scale: float = 1.0,
        activity: float = 1.0,
    ) -> None:
        super().__init__(
            host=host, port=DEFAULT_PORT + index if port is None else port, seed=seed, time_scale=time_scale
        )
        if kind not in MODELS:
            raise ValueError(f"unknown Shure simulator kind {kind!r}; known: {', '.join(MODELS)}")
        self.kind = MODELS[kind]
        self.dialect = self.kind.dialect
        self.family: Family = self.dialect.family
        self.index = index
        self.activity = activity
        self._device_id = f"{self.kind.model[:4]}{(seed * 7919 + index) % 10000:04d}"
        self.flash = False
        self._flash_until = 0.0
        self.encryption = False
        self.channels = [self._new_channel(n) for n in range(1, self.kind.channels + 1)]
        self.received: deque[Message] = deque(maxlen=_RECEIVED_KEPT)
        self._controllers: set[_Controller] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._published: dict[tuple[int | None, str], str] = {}

    def _new_channel(self, n: int) -> _Channel:
        rnd = self.random
        low, high = self.kind.band_khz
        step = 25
        frequency = low + step * rnd.randrange((high - low) // step)
        width = self.dialect.name_width
        prefix = "HH" if n % 2 else "BP"
        person = _PEOPLE[(n - 1 + self.seed) % len(_PEOPLE)]
        if len(prefix) + 3 + len(person) > width:
            # An 8-character family holds "HH01 " and three letters: a name that fits, as a
            # real engineer would choose, rather than one cut short ("HH01 Fat").
            person = _SHORT_PEOPLE[(n - 1 + self.seed) % len(_SHORT_PEOPLE)]
        name = f"{prefix}{n:02d} {person}"[:width]
        channel = _Channel(
            index=n,
            name=name,
            frequency_khz=frequency,
            group_channel=f"{1 + rnd.randrange(9):02d},{n:02d}",
            tx_model=self.kind.tx_models[(n - 1) % len(self.kind.tx_models)],
            battery_min=_BATTERY_CAPACITY_MIN * (0.3 + 0.7 * rnd.random()),
            battery_cycles=rnd.randrange(5, 300),
            base_rf_dbm=-70.0 + 25.0 * rnd.random(),
            tx_offset_raw=12 if self.family is Family.AXIENT else 0,
        )
        channel.rf_dbm = channel.base_rf_dbm
        return channel

    # -- identity ----------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The model name (``ULXD4D``, ``AD4Q`` ...)."""
        return self.kind.model

    @property
    def device_id(self) -> str:
        """The device id the receiver reports."""
        return self._device_id

    def announcement(self) -> Announcement:
        """DNS-SD ``_shure._tcp`` with ``model=``, and the SLP device class id where Shure has one."""
        return Announcement(
            service_type="_shure._tcp.local.",
            instance_name=f"{self.kind.model} {self._device_id}",
            port=self.port,
            properties={"model": self.kind.model},
            slp_dcid=self.kind.dcid,
        )

    @property
    def controller_count(self) -> int:
        """How many controllers are connected now."""
        return len(self._controllers)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; afterwards ``port`` is the bound port."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._published = self._snapshot()
        self._tick_task = asyncio.create_task(self._tick_loop(), name=f"shure-sim-{self.port}-tick")

    async def stop(self) -> None:
        """Stop serving and close every connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tick, self._tick_task = self._tick_task, None
        if tick is not None:
            tick.cancel()
            await _finish([tick])
        await self.drop_connections()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await server.wait_closed()

    async def drop_connections(self) -> None:
        """Close every controller connection abruptly."""
        for controller in list(self._controllers):
            controller.writer.transport.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await _finish(handlers)

    # -- what tests and demos drive -----------------------------------------------------

    def channel(self, index: int) -> _Channel:
        """The simulated channel ``index`` (1-based)."""
        return self.channels[index - 1]

    def set_transmitter_on(self, index: int, on: bool) -> None:
        """Switch the transmitter of channel ``index`` on or off."""
        self.channel(index).tx_on = on
        self._push_changes()

    def set_battery(
        self, index: int, *, bars: int | None = None, percent: int | None = None, minutes: float | None = None
    ) -> None:
        """Set the transmitter battery of channel ``index`` by bars, percent or minutes left."""
        channel = self.channel(index)
        if bars is not None:
            percent = bars * 20
        if percent is not None:
            minutes = _BATTERY_CAPACITY_MIN * percent / 100.0
        if minutes is not None:
            channel.battery_min = max(0.0, min(_BATTERY_CAPACITY_MIN, minutes))
        self._push_changes()

    def set_name(self, index: int, name: str) -> None:
        """Rename channel ``index`` as if on the front panel."""
        self.channel(index).name = name[: self.dialect.name_width]
        self._push_changes()

    def set_interference(self, index: int, detected: bool) -> None:
        """Report (or clear) interference on channel ``index``."""
        self.channel(index).interference = detected
        self._push_changes()

    def set_rf(self, index: int, dbm: float) -> None:
        """Move the transmitter of channel ``index`` so that it arrives at about ``dbm``."""
        channel = self.channel(index)
        channel.base_rf_dbm = dbm
        channel.rf_dbm = dbm

    # -- values as the hardware writes them -------------------------------------------

    def _device_value(self, param: str) -> str | None:
        kind = self.kind
        values: dict[str, str | int] = {
            "FW_VER": kind.firmware,
            "DEVICE_ID": self._device_id,
            "FLASH": "ON" if self.flash else "OFF",
            "ENCRYPTION": "ON" if self.encryption else "OFF",
            "ENCRYPTION_MODE": "AUTO" if self.encryption else "OFF",
            "AUDIO_SUMMING_MODE": "OFF",
            "FREQUENCY_DIVERSITY_MODE": "OFF",
            "HIGH_DENSITY": "OFF",
            "MODEL": kind.reported_model or kind.model,
            "QUADVERSITY_MODE": "ON" if kind.antennas == 4 else "OFF",
            "RF_BAND": kind.rf_band,
            "TRANSMISSION_MODE": "STANDARD",
            "LOCK_STATUS": "OFF",
        }
        if param not in self.dialect.device_params:
            return None
        return self.dialect.format_value(param, values[param])

    def _channel_value(self, channel: _Channel, param: str) -> str | None:
        if param not in self.dialect.channel_params:
            return None
        on = channel.tx_on
        ad = self.family is Family.AXIENT
        minutes = int(channel.battery_min)
        values: dict[str, str | int] = {
            "CHAN_NAME": channel.name,
            "AUDIO_GAIN": channel.gain,
            "FREQUENCY": channel.frequency_khz,
            "FREQUENCY2": 0,
            "GROUP_CHAN": channel.group_channel,
            "GROUP_CHANNEL": channel.group_channel,
            "GROUP_CHANNEL2": "--,--",
            "AUDIO_MUTE": "ON" if channel.muted else "OFF",
            "RF_INT_DET": "CRITICAL" if channel.interference else "NONE",
            "INTERFERENCE_STATUS": "DETECTED" if channel.interference else "NONE",
            "ENCRYPTION_STATUS": "OK",
            "UNREGISTERED_TX_STATUS": "OK",
            "FD_MODE": "OFF",
            "TX_TYPE": channel.tx_model if on else "UNKN",
            "TX_MODEL": channel.tx_model if on else "UNKNOWN",
            "TX_OFFSET": channel.tx_offset_raw if on else 255,
            "TX_RF_PWR": "NORMAL" if on else "UNKN",
            "TX_MUTE_STATUS": ("ON" if channel.tx_muted else "OFF") if on else "UNKN",
            "TX_MUTE_MODE_STATUS": ("MUTE" if channel.tx_muted else "OFF") if on else "UNKNOWN",
            "TX_PWR_LOCK": "OFF" if on else "UNKN",
            "TX_MENU_LOCK": "OFF" if on else "UNKN",
            "TX_LOCK": "NONE" if on else "UNKNOWN",
            "BATT_BARS": channel.battery_bars if on else 255,
            "TX_BATT_BARS": channel.battery_bars if on else 255,
            "BATT_CHARGE": channel.battery_percent if on else 255,
            "TX_BATT_CHARGE_PERCENT": channel.battery_percent if on else 255,
            "BATT_CYCLE": channel.battery_cycles if on else 65535,
            "TX_BATT_CYCLE_COUNT": channel.battery_cycles if on else 65535,
            "TX_BATT_HEALTH_PERCENT": channel.battery_health if on else 255,
            "BATT_RUN_TIME": minutes if on else 65535,
            "TX_BATT_MINS": minutes if on else 65535,
            "BATT_TYPE": "LION" if on else "UNKN",
            "TX_BATT_TYPE": "LION" if on else "UNKNOWN",
            "BATT_TEMP_C": channel.battery_temp_c if on else 255,
            "TX_POWER_LEVEL": (20 if ad else 10) if on else 255,
            "CHAN_QUALITY": 5 if on else 255,
        }
        return self.dialect.format_value(param, values[param])

    def _snapshot(self) -> dict[tuple[int | None, str], str]:
        values: dict[tuple[int | None, str], str] = {}
        for param in self.dialect.device_params:
            value = self._device_value(param)
            if value is not None:
                values[None, param] = value
        for channel in self.channels:
            for param in self.dialect.channel_params:
                if param == "METER_RATE":
                    continue
                value = self._channel_value(channel, param)
                if value is not None:
                    values[channel.index, param] = value
        return values

    def _push_changes(self) -> set[tuple[int | None, str]]:
        """Send a REP of every value that changed since the last push to every controller."""
        snapshot = self._snapshot()
        changed = {key for key, value in snapshot.items() if self._published.get(key) != value}
        self._published = snapshot
        if changed and not self.faults.silent:
            payload = b"".join(_rep(key[0], key[1], snapshot[key]) for key in sorted(changed, key=_order))
            for controller in list(self._controllers):
                self._write(controller, payload)
        return changed

    # -- serving -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        controller = _Controller(writer)
        self._controllers.add(controller)
        controller.meter_task = asyncio.create_task(self._meter_loop(controller))
        frames = FrameReader()
        try:
            while True:
                # asyncio.timeout(), not wait_for(): on Python 3.11 wait_for() can lose the
                # cancellation from drop_connections() when data arrives at the same moment.
                async with asyncio.timeout(_IDLE_TIMEOUT_S):
                    data = await reader.read(64 * 1024)
                if not data:
                    break
                errors = frames.parse_errors
                for message in frames.feed(data):
                    self.received.append(message)
                    await self._answer(controller, message)
                # What the device cannot make sense of gets the same answer as an unknown command.
                for _ in range(frames.parse_errors - errors):
                    await self._answer(controller, None)
        except (OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # drop_connections() hung up on this controller: the handler ends normally, because
            # Python 3.11's start_server() reports a cancelled connection handler as an error.
            pass
        finally:
            self._controllers.discard(controller)
            writer.transport.abort()
            controller.meter_task.cancel()
            try:
                # The same for a cancellation that arrives while the metering task winds down.
                with contextlib.suppress(asyncio.CancelledError):
                    await _finish([controller.meter_task])
            finally:
                self._handlers.discard(task)

    def _write(self, controller: _Controller, payload: bytes) -> None:
        transport = controller.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > _MAX_WRITE_BUFFER:
            transport.abort()
            return
        if self.faults.garbage:
            payload = self._junk() + payload
        controller.writer.write(payload)

    def _junk(self) -> bytes:
        # Never a '<': junk must not be able to turn into the start of a real message.
        size = 1 + self.random.randrange(12)
        return bytes(b if b != 0x3C else 0x3E for b in self.random.randbytes(size))

    async def _answer(self, controller: _Controller, message: Message | None) -> None:
        faults = self.faults
        if faults.silent:
            return
        if faults.delay_s > 0:
            await asyncio.sleep(faults.delay_s)
        if faults.rep_err:
            self._write(controller, b"< REP ERR >")
            return
        if isinstance(message, Get):
            reply = self._answer_get(controller, message)
        elif isinstance(message, Set):
            reply = self._answer_set(controller, message)
        else:
            reply = None
        self._write(controller, b"< REP ERR >" if reply is None else reply)

    def _targets(self, channel: int) -> list[_Channel] | None:
        if channel == 0:
            return self.channels
        if 1 <= channel <= len(self.channels):
            return [self.channels[channel - 1]]
        return None

    def _answer_get(self, controller: _Controller, get: Get) -> bytes | None:
        if get.channel is None:
            device_value = self._device_value(get.param)
            if device_value is None or get.position is not None:
                return None
            return _rep(None, get.param, device_value)
        targets = self._targets(get.channel)
        if targets is None:
            return None
        if get.param == "ALL":
            params: tuple[str, ...] = self.dialect.channel_params
        else:
            params = (get.param,)
        out: list[bytes] = []
        for channel in targets:
            for param in params:
                if param == "RSSI" and self.family is Family.AXIENT and get.position is not None:
                    if not 1 <= get.position <= self.kind.antennas:
                        return None
                    rssi = self.dialect.format_value("RSSI", _clamp(channel.rf_dbm + 120, 0, 255))
                    out.append(f"< REP {channel.index} RSSI {get.position} {rssi} >".encode("ascii"))
                    continue
                if get.position is not None:
                    return None
                if param == "METER_RATE":
                    value: str | None = f"{controller.rates_ms.get(channel.index, 0):05d}"
                else:
                    value = self._channel_value(channel, param)
                if value is None:
                    return None
                out.append(_rep(channel.index, param, value))
        return b"".join(out)

    def _answer_set(self, controller: _Controller, command: Set) -> bytes | None:
        dialect = self.dialect
        param, raw = command.param, command.value
        if command.channel is None:
            flash = param == "FLASH" and dialect.supports_flash
            if flash and raw in ("ON", "OFF") and command.position is None:
                self.flash = raw == "ON"
                self._flash_until = asyncio.get_running_loop().time() + _FLASH_S
                return self._confirm([param])
            return None
        targets = self._targets(command.channel)
        if targets is None or command.position is not None:
            return None
        if param == "METER_RATE":
            # 00000 (off) or 00100..65535 ms, as the hardware takes.
            if len(raw) != 5 or not raw.isdigit() or 0 < int(raw) < 100 or int(raw) > 65_535:
                return None
            now = asyncio.get_running_loop().time()
            for channel in targets:
                rate = int(raw)
                if rate:
                    controller.rates_ms[channel.index] = rate
                    controller.next_due[channel.index] = now + rate / 1000.0
                else:
                    controller.rates_ms.pop(channel.index, None)
                    controller.next_due.pop(channel.index, None)
            controller.wake.set()
            return b"".join(_rep(c.index, param, raw) for c in targets)
        if param == "CHAN_NAME":
            name = raw.rstrip()
            if len(name) > dialect.name_width:
                return None
            for channel in targets:
                channel.name = name
        elif param == "AUDIO_MUTE" and dialect.supports_mute and raw in ("ON", "OFF", "TOGGLE"):
            for channel in targets:
                channel.muted = (not channel.muted) if raw == "TOGGLE" else raw == "ON"
        elif param == "AUDIO_GAIN" and raw.isdigit() and 0 <= int(raw) <= 60:
            for channel in targets:
                channel.gain = int(raw)
        elif param == "FREQUENCY" and len(raw) == dialect.frequency_digits and raw.isdigit():
            low, high = self.kind.band_khz
            if not low <= int(raw) <= high:
                return None
            for channel in targets:
                channel.frequency_khz = int(raw)
        else:
            return None
        return self._confirm([param], targets)

    def _confirm(self, params: list[str], targets: list[_Channel] | None = None) -> bytes:
        # Changes go to every controller; the one that asked gets its answer even if nothing changed.
        changed = self._push_changes()
        keys: list[tuple[int | None, str]]
        if targets is None:
            keys = [(None, p) for p in params]
        else:
            keys = [(c.index, p) for c in targets for p in params]
        return b"".join(_rep(k[0], k[1], self._published[k]) for k in keys if k not in changed)

    # -- metering and the world ---------------------------------------------------------

    async def _meter_loop(self, controller: _Controller) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout = None
            if controller.next_due:
                timeout = max(0.0, min(controller.next_due.values()) - loop.time())
            # asyncio.timeout(), not wait_for(): on Python 3.11 wait_for() loses a cancellation
            # that arrives together with wake (a METER_RATE 00000 just before the hang-up), and
            # the handler awaiting this task on close would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await controller.wake.wait()
            controller.wake.clear()
            now = loop.time()
            due = [n for n, at in controller.next_due.items() if at <= now]
            if not due:
                continue
            for index in due:
                period = controller.rates_ms[index] / 1000.0
                at = controller.next_due[index] + period
                controller.next_due[index] = at if at > now else now + period
            if not self.faults.silent:
                self._write(controller, b"".join(self._sample(self.channels[i - 1]) for i in sorted(due)))

    def _sample(self, channel: _Channel) -> bytes:
        on = channel.tx_on
        rf = channel.rf_dbm if on else -108.0 - self.random.random() * 3
        family = self.family
        if family in (Family.ULXD, Family.QLXD):
            ant = ("AX" if channel.active_antenna == 0 else "XB") if on else "XX"
            audio = _clamp(channel.audio_dbfs + 50, 0, 50) if on else 0
            fields = f"{ant} {_clamp(rf + 128, 0, 115):03d} {audio:03d}"
        elif family is Family.AXIENT:
            count = self.kind.antennas
            if on:
                quality = _clamp((rf + 100) / 8, 0, 5)
                peak = _clamp(channel.audio_dbfs + 6 + 120, 0, 120)
                rms = _clamp(channel.audio_dbfs + 120, 0, 120)
                bitmap = (1 << _clamp((channel.audio_dbfs + 50) / 10, 0, 5)) - 1
                pairs = []
                stats = ""
                for i in range(count):
                    level = rf - (0 if i == channel.active_antenna else 3 + 2 * i)
                    stats += "B" if level > -85 else "R"
                    pairs.append(f"31 {_clamp(level + 120, 0, 255):03d}")
                fields = f"{quality:03d} {bitmap:03d} {peak:03d} {rms:03d} {stats} {' '.join(pairs)}"
            else:
                pairs = [f"00 {_clamp(rf + 120 + i, 0, 255):03d}" for i in range(count)]
                fields = f"255 000 005 033 {'X' * count} {' '.join(pairs)}"
        else:
            peak = _clamp(channel.audio_dbfs + 6 + 120, 0, 120) if on else 0
            rms = _clamp(channel.audio_dbfs + 120, 0, 120) if on else 0
            fields = f"{peak:03d} {rms:03d} {_clamp(rf + 120, 0, 255):03d}"
        return f"< SAMPLE {channel.index} ALL {fields} >".encode("ascii")

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(_TICK_S)
            now = loop.time()
            self.advance(now - last)
            last = now
            if self.flash and now >= self._flash_until:
                self.flash = False
            self._push_changes()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of real time pass: batteries drain ``time_scale`` times faster."""
        rnd = self.random
        sim_minutes = seconds * self.time_scale / 60.0
        events = self.activity * seconds
        for channel in self.channels:
            # Random transmitter power cycles: about one per channel every half hour.
            if rnd.random() < events / 1800.0:
                channel.tx_on = not channel.tx_on
                if channel.tx_on and channel.battery_min <= 0:
                    channel.battery_min = _BATTERY_CAPACITY_MIN
            if rnd.random() < events / 3600.0:
                channel.interference = not channel.interference
            if not channel.tx_on:
                channel.audio_dbfs = -120.0
                continue
            channel.battery_min -= sim_minutes
            if channel.battery_min <= 0:
                channel.battery_min = 0.0
                channel.tx_on = False
                continue
            # RF: a slow random walk around where the performer stands, plus fades that decay.
            if rnd.random() < events / 20.0:
                channel.fade_db = 20.0 + 25.0 * rnd.random()
            channel.fade_db *= 0.8
            channel.rf_dbm = channel.base_rf_dbm + rnd.gauss(0.0, 1.5) - channel.fade_db
            if rnd.random() < 0.05:
                channel.active_antenna = rnd.randrange(self.kind.antennas)
            # Audio: speech comes in bursts, peaks (6 dB over the level) some 12 dB under full
            # scale, as a gain set by an engineer leaves them; and now and then a shout that
            # clips, about once per channel in ten minutes, not every few seconds.
            channel.talk = min(1.0, max(0.0, channel.talk + rnd.gauss(0.0, 0.15)))
            channel.audio_dbfs = -48.0 + 30.0 * channel.talk + rnd.gauss(0.0, 2.0)
            if rnd.random() < events / 600.0:
                channel.audio_dbfs = -3.0 + rnd.gauss(0.0, 1.0)


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Wait, bounded, for cancelled tasks to end; re-raise what one of them failed with."""
    if not tasks:
        return
    # asyncio.wait() neither raises the tasks' CancelledError nor swallows the caller's own.
    done, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S)
    if pending:
        logger.warning("shure simulator tasks did not end", extra={"tasks": len(pending)})
    for task in done:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def _rep(channel: int | None, param: str, value: str) -> bytes:
    if channel is None:
        return f"< REP {param} {value} >".encode("ascii")
    return f"< REP {channel} {param} {value} >".encode("ascii")


def _order(key: tuple[int | None, str]) -> tuple[int, str]:
    return (0 if key[0] is None else key[0], key[1])


SIMULATOR_KINDS: dict[str, Callable[..., ShureSimulator]] = {
    kind: functools.partial(ShureSimulator, kind) for kind in MODELS
}
"""Simulator constructors by kind; keyword arguments go to :class:`ShureSimulator`."""
