"""What each Shure family says and how it maps into the normalized model.

ULX-D and QLX-D share one dialect with small differences; Axient Digital (AD4D/AD4Q) and
SLX-D each have their own. A dialect knows parameter names, brace-string widths, frequency
digits, SAMPLE layouts and offsets, and the sentinels (255, 65533-65535) that mean unknown.
Where the public documents give no width, the value we chose is marked "assumed".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from micboard.shared.model import Antenna, AntennaState, ChannelMeter, Family, ReceiverChannel, Transmitter

from .protocol import brace

_ANTENNAS = (Antenna.A, Antenna.B, Antenna.C, Antenna.D)
# ULX-D/QLX-D ``ant``: a letter where the antenna is active, ``X`` where it is not.
_ACTIVE_OR_NOT = {True: AntennaState.ACTIVE, False: AntennaState.INACTIVE}
# Axient Digital ``antStats``: B blue (receiving), R red (receiving poorly), X off.
_AD_ANTENNA_STATES = {"B": AntennaState.ACTIVE, "R": AntennaState.RED, "X": AntennaState.INACTIVE}
_UNKNOWN_WORDS = frozenset({"UNKN", "UNKNOWN", "", "NONE", "N/A"})
RUN_TIME_COMMUNICATION_WARNING = 65533
RUN_TIME_CALCULATING = 65534
_NO_TRANSMITTER = Transmitter()
MAX_TEXT = 128
"""Characters a text value of the model (``ShortText``) may hold."""


class TxParams(NamedTuple):
    """The parameter names a family uses for its transmitter data (``None``: not reported)."""

    model: str
    bars: str
    percent: str | None
    minutes: str
    battery_type: str | None
    cycles: str | None
    health: str | None
    temp_c: str | None
    muted: str | None
    offset: str | None
    rf_power: str | None
    lock: str | None


def _int(raw: str | None, low: int, high: int) -> int | None:
    # Anything outside the documented range (sentinels included) reads as unknown.
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _word(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = raw.strip()
    # The model's text fields hold 128 characters: a longer value (odd firmware, a hostile
    # device) is cut, as the SSC mapping cuts it, rather than failing the whole snapshot.
    return None if text.upper() in _UNKNOWN_WORDS else text[:MAX_TEXT]


def _on_off(raw: str | None) -> bool | None:
    if raw is None:
        return None
    text = raw.strip().upper()
    if text in ("ON", "MUTE", "MUTED"):
        return True
    if text in ("OFF", "UNMUTE", "UNMUTED"):
        return False
    return None


@dataclass(frozen=True, slots=True)
class Dialect:
    """The command-string dialect of one receiver family."""

    family: Family
    name_width: int
    frequency_digits: int
    group_param: str
    tx: TxParams
    # Device-level parameters a controller reads on connect, in order.
    identity_params: tuple[str, ...]
    # Every device-level parameter the family answers to.
    device_params: tuple[str, ...]
    # Every channel parameter ``GET n ALL`` reports, in order.
    channel_params: tuple[str, ...]
    string_widths: Mapping[str, int] = field(default_factory=dict)
    number_digits: Mapping[str, int] = field(default_factory=dict)
    supports_mute: bool = False
    supports_flash: bool = True
    tx_offset_bias_db: int = 0
    tx_offset_range: tuple[int, int] = (0, 21)
    models_by_channels: Mapping[int, str] = field(default_factory=dict)

    # -- wire values -------------------------------------------------------------------

    def format_value(self, param: str, value: str | int) -> str:
        """``value`` as the hardware writes ``param``: padded brace string or fixed digits."""
        width = self.string_widths.get(param)
        if width is not None:
            return brace(str(value), width)
        digits = self.number_digits.get(param)
        if digits is not None and isinstance(value, int):
            return str(value).zfill(digits)
        return str(value)

    # -- state -------------------------------------------------------------------------

    def device_model(self, raw: Mapping[str, str], channel_count: int) -> str | None:
        """The model: as reported (AD, SLX-D) or inferred from the channel count (ULX-D, QLX-D)."""
        reported = _word(raw.get("MODEL"))
        if reported is not None:
            return reported
        return self.models_by_channels.get(channel_count)

    def channel(self, index: int, raw: Mapping[str, str], device_raw: Mapping[str, str]) -> ReceiverChannel:
        """The normalized channel ``index`` from the last REP values of the channel and device."""
        name = raw.get("CHAN_NAME")
        frequency = _int(raw.get("FREQUENCY"), 1, 9_999_999)
        group = _word(raw.get(self.group_param))
        if group is not None and group.replace(",", "").strip("-") == "":
            group = None
        gain = _int(raw.get("AUDIO_GAIN"), 0, 60)
        warnings: list[str] = []
        interference = self._interference(raw)
        if interference:
            warnings.append("interference")
        warnings.extend(self._status_warnings(raw))
        transmitter = self.transmitter(raw)
        minutes_raw = _int(raw.get(self.tx.minutes), 0, 65535)
        if minutes_raw == RUN_TIME_COMMUNICATION_WARNING:
            warnings.append("tx_communication")
        return ReceiverChannel(
            index=index,
            name=None if name is None else name.rstrip()[:128],
            frequency_khz=frequency,
            group_channel=group,
            audio_gain_db=None if gain is None else gain - 18,
            muted=_on_off(raw.get("AUDIO_MUTE")) if self.supports_mute else None,
            interference=interference,
            encrypted=self._encrypted(raw, device_raw),
            warnings=tuple(warnings),
            transmitter=transmitter,
        )

    def transmitter(self, raw: Mapping[str, str]) -> Transmitter | None:
        """The linked transmitter, or ``None`` when the receiver knows nothing about one."""
        tx = self.tx
        offset = None
        if tx.offset is not None:
            low, high = self.tx_offset_range
            value = _int(raw.get(tx.offset), low, high)
            offset = None if value is None else value - self.tx_offset_bias_db
        power = _word(raw.get(tx.rf_power)) if tx.rf_power else None
        if power is not None and power.isdigit():
            power = None if int(power) >= 255 else f"{int(power)} mW"
        transmitter = Transmitter(
            model=_word(raw.get(tx.model)),
            battery_bars=_int(raw.get(tx.bars), 0, 5),
            battery_percent=_int(raw.get(tx.percent), 0, 100) if tx.percent else None,
            runtime_min=_int(raw.get(tx.minutes), 0, 65532),
            battery_type=_word(raw.get(tx.battery_type)) if tx.battery_type else None,
            battery_cycles=_int(raw.get(tx.cycles), 0, 65534) if tx.cycles else None,
            battery_health_percent=_int(raw.get(tx.health), 0, 100) if tx.health else None,
            battery_temp_c=_int(raw.get(tx.temp_c), -40, 125) if tx.temp_c else None,
            muted=_on_off(raw.get(tx.muted)) if tx.muted else None,
            tx_offset_db=offset,
            rf_power=power,
            locked=self._lock(raw),
        )
        return None if transmitter == _NO_TRANSMITTER else transmitter

    def _lock(self, raw: Mapping[str, str]) -> str | None:
        if self.tx.lock is not None:
            return _word(raw.get(self.tx.lock))
        return None

    def _interference(self, raw: Mapping[str, str]) -> bool | None:
        return None

    def _status_warnings(self, raw: Mapping[str, str]) -> list[str]:
        return []

    def _encrypted(self, raw: Mapping[str, str], device_raw: Mapping[str, str]) -> bool | None:
        return None

    # -- metering ----------------------------------------------------------------------

    def meter(self, index: int, fields: tuple[str, ...]) -> ChannelMeter | None:
        """The levels of a ``SAMPLE`` line, or ``None`` if its fields do not fit the layout."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UlxdDialect(Dialect):
    """ULX-D and QLX-D: 8-character names, 6-digit frequencies, ``ant rf audio`` samples."""

    def meter(self, index: int, fields: tuple[str, ...]) -> ChannelMeter | None:
        """``ant rf audio``: rf dBm = value - 128 on the active antenna(s), audio dBFS = value - 50."""
        if len(fields) != 3 or not 0 < index <= 64:
            return None
        ant, rf_raw, audio_raw = fields
        if len(ant) != 2:
            return None
        try:
            rf = int(rf_raw)
            audio = int(audio_raw)
        except ValueError:
            return None
        if not (0 <= rf <= 115 and 0 <= audio <= 50):
            return None
        level = float(rf - 128)
        a_on = ant[0] == "A"
        b_on = ant[1] == "B"
        active = Antenna.A if a_on else (Antenna.B if b_on else None)
        return ChannelMeter(
            index=index,
            rf_dbm=(level if a_on else None, level if b_on else None),
            active_antenna=active,
            antenna_states=(_ACTIVE_OR_NOT[a_on], _ACTIVE_OR_NOT[b_on]),
            audio_dbfs=float(audio - 50),
        )

    def _lock(self, raw: Mapping[str, str]) -> str | None:
        # ULX-D reports power and menu locks separately; the model has one lock field.
        power = _on_off(raw.get("TX_PWR_LOCK"))
        menu = _on_off(raw.get("TX_MENU_LOCK"))
        if power is None and menu is None:
            return None
        if power and menu:
            return "ALL"
        if power:
            return "POWER"
        return "MENU" if menu else "NONE"

    def _interference(self, raw: Mapping[str, str]) -> bool | None:
        if "RF_INT_DET" not in raw:
            return None
        return raw["RF_INT_DET"].strip().upper() == "CRITICAL"

    def _encrypted(self, raw: Mapping[str, str], device_raw: Mapping[str, str]) -> bool | None:
        return _on_off(device_raw.get("ENCRYPTION"))


@dataclass(frozen=True, slots=True)
class AxientDialect(Dialect):
    """Axient Digital AD4D/AD4Q: 31-character names, 7-digit frequencies, diversity samples."""

    def meter(self, index: int, fields: tuple[str, ...]) -> ChannelMeter | None:
        """``qual audBitmap audPeak audRms antStats (bitmap rssi)*n``; levels are value - 120."""
        if len(fields) < 9 or not 0 < index <= 64:
            return None
        stats = fields[4]
        count = len(stats)
        if count not in (2, 4) or len(fields) != 5 + 2 * count:
            return None
        try:
            quality = int(fields[0])
            peak = int(fields[2])
            rms = int(fields[3])
            rssi = [int(fields[6 + 2 * i]) for i in range(count)]
        except ValueError:
            return None
        if not (0 <= peak <= 255 and 0 <= rms <= 255) or any(not 0 <= r <= 255 for r in rssi):
            return None
        levels = tuple(float(r - 120) for r in rssi)
        # A character this parser does not know leaves every state unknown rather than guessed.
        states = tuple(_AD_ANTENNA_STATES.get(c) for c in stats)
        known = () if None in states else cast("tuple[AntennaState, ...]", states)
        # The antenna carrying the transmitter best is the one the operator cares about.
        active = None
        best = -1
        for i in range(count):
            if stats[i] != "X" and rssi[i] > best:
                best = rssi[i]
                active = _ANTENNAS[i]
        return ChannelMeter(
            index=index,
            rf_dbm=levels,
            active_antenna=active,
            antenna_states=known,
            audio_dbfs=float(rms - 120),
            audio_peak_dbfs=float(peak - 120),
            link_quality_percent=quality * 20 if 0 <= quality <= 5 else None,
        )

    def _interference(self, raw: Mapping[str, str]) -> bool | None:
        value = _word(raw.get("INTERFERENCE_STATUS"))
        if value is None:
            return False if "INTERFERENCE_STATUS" in raw else None
        return value.upper() not in ("OK", "OFF")

    def _status_warnings(self, raw: Mapping[str, str]) -> list[str]:
        warnings = []
        if (_word(raw.get("ENCRYPTION_STATUS")) or "OK").upper() not in ("OK", "OFF"):
            warnings.append("encryption")
        if (_word(raw.get("UNREGISTERED_TX_STATUS")) or "OK").upper() not in ("OK", "OFF"):
            warnings.append("unregistered_tx")
        return warnings

    def _encrypted(self, raw: Mapping[str, str], device_raw: Mapping[str, str]) -> bool | None:
        mode = _word(device_raw.get("ENCRYPTION_MODE"))
        return None if mode is None else mode.upper() != "OFF"


@dataclass(frozen=True, slots=True)
class SlxdDialect(Dialect):
    """SLX-D: 31-character names, ``audPeak audRms rssi`` samples, no mute."""

    def meter(self, index: int, fields: tuple[str, ...]) -> ChannelMeter | None:
        """``audPeak audRms rssi``, all value - 120; SLX-D reports one combined RSSI."""
        if len(fields) != 3 or not 0 < index <= 64:
            return None
        try:
            peak = int(fields[0])
            rms = int(fields[1])
            rssi = int(fields[2])
        except ValueError:
            return None
        if not (0 <= peak <= 255 and 0 <= rms <= 255 and 0 <= rssi <= 255):
            return None
        return ChannelMeter(
            index=index,
            rf_dbm=(float(rssi - 120),),
            audio_dbfs=float(rms - 120),
            audio_peak_dbfs=float(peak - 120),
        )


_ULX_TX = TxParams(
    model="TX_TYPE",
    bars="BATT_BARS",
    percent="BATT_CHARGE",
    minutes="BATT_RUN_TIME",
    battery_type="BATT_TYPE",
    cycles="BATT_CYCLE",
    health=None,
    temp_c="BATT_TEMP_C",
    muted="TX_MUTE_STATUS",
    offset="TX_OFFSET",
    rf_power="TX_RF_PWR",
    lock=None,
)
_ULX_TX_PARAMS = (
    "TX_TYPE",
    "TX_OFFSET",
    "TX_RF_PWR",
    "TX_MUTE_STATUS",
    "TX_PWR_LOCK",
    "TX_MENU_LOCK",
    "BATT_BARS",
    "BATT_CHARGE",
    "BATT_CYCLE",
    "BATT_RUN_TIME",
    "BATT_TYPE",
    "BATT_TEMP_C",
)
_ULX_DIGITS = {
    "METER_RATE": 5,
    "AUDIO_GAIN": 3,
    "FREQUENCY": 6,
    "TX_OFFSET": 3,
    "BATT_BARS": 3,
    "BATT_CHARGE": 3,
    "BATT_CYCLE": 5,
    "BATT_RUN_TIME": 5,
    "BATT_TEMP_C": 3,
}
# FW_VER 18 and DEVICE_ID 8 characters on ULX-D/QLX-D: assumed.
_ULX_STRINGS = {"CHAN_NAME": 8, "GROUP_CHAN": 5, "FW_VER": 18, "DEVICE_ID": 8}

ULXD = UlxdDialect(
    family=Family.ULXD,
    name_width=8,
    frequency_digits=6,
    group_param="GROUP_CHAN",
    tx=_ULX_TX,
    identity_params=("FW_VER", "DEVICE_ID", "ENCRYPTION"),
    device_params=(
        "FW_VER",
        "DEVICE_ID",
        "ENCRYPTION",
        "AUDIO_SUMMING_MODE",
        "FREQUENCY_DIVERSITY_MODE",
        "HIGH_DENSITY",
        "FLASH",
    ),
    channel_params=(
        "CHAN_NAME",
        "METER_RATE",
        "AUDIO_GAIN",
        "FREQUENCY",
        "GROUP_CHAN",
        "AUDIO_MUTE",
        "RF_INT_DET",
        *_ULX_TX_PARAMS,
    ),
    string_widths=_ULX_STRINGS,
    number_digits=_ULX_DIGITS,
    supports_mute=True,
    supports_flash=True,
    tx_offset_range=(0, 21),
    models_by_channels={1: "ULXD4", 2: "ULXD4D", 4: "ULXD4Q"},
)

QLXD = UlxdDialect(
    family=Family.QLXD,
    name_width=8,
    frequency_digits=6,
    group_param="GROUP_CHAN",
    tx=_ULX_TX,
    identity_params=("FW_VER", "DEVICE_ID", "ENCRYPTION"),
    device_params=("FW_VER", "DEVICE_ID", "ENCRYPTION"),
    channel_params=("CHAN_NAME", "METER_RATE", "AUDIO_GAIN", "FREQUENCY", "GROUP_CHAN", *_ULX_TX_PARAMS),
    string_widths=_ULX_STRINGS,
    number_digits=_ULX_DIGITS,
    supports_mute=False,
    supports_flash=False,
    tx_offset_range=(0, 21),
    models_by_channels={1: "QLXD4"},
)

AXIENT = AxientDialect(
    family=Family.AXIENT,
    name_width=31,
    frequency_digits=7,
    group_param="GROUP_CHANNEL",
    tx=TxParams(
        model="TX_MODEL",
        bars="TX_BATT_BARS",
        percent="TX_BATT_CHARGE_PERCENT",
        minutes="TX_BATT_MINS",
        battery_type="TX_BATT_TYPE",
        cycles="TX_BATT_CYCLE_COUNT",
        health="TX_BATT_HEALTH_PERCENT",
        temp_c=None,
        muted="TX_MUTE_MODE_STATUS",
        offset="TX_OFFSET",
        rf_power="TX_POWER_LEVEL",
        lock="TX_LOCK",
    ),
    identity_params=("MODEL", "FW_VER", "DEVICE_ID", "RF_BAND", "ENCRYPTION_MODE"),
    device_params=(
        "FW_VER",
        "DEVICE_ID",
        "ENCRYPTION_MODE",
        "MODEL",
        "QUADVERSITY_MODE",
        "RF_BAND",
        "TRANSMISSION_MODE",
        "FLASH",
    ),
    channel_params=(
        "CHAN_NAME",
        "METER_RATE",
        "AUDIO_GAIN",
        "FREQUENCY",
        "GROUP_CHANNEL",
        "AUDIO_MUTE",
        "INTERFERENCE_STATUS",
        "ENCRYPTION_STATUS",
        "UNREGISTERED_TX_STATUS",
        "FD_MODE",
        "FREQUENCY2",
        "GROUP_CHANNEL2",
        "TX_MODEL",
        "TX_BATT_BARS",
        "TX_BATT_CHARGE_PERCENT",
        "TX_BATT_CYCLE_COUNT",
        "TX_BATT_HEALTH_PERCENT",
        "TX_BATT_MINS",
        "TX_BATT_TYPE",
        "TX_POWER_LEVEL",
        "TX_MUTE_MODE_STATUS",
        "TX_LOCK",
        "TX_OFFSET",
        "CHAN_QUALITY",
    ),
    # DEVICE_ID 31, MODEL 32 and RF_BAND 8 characters on AD: assumed.
    string_widths={
        "CHAN_NAME": 31,
        "FW_VER": 24,
        "DEVICE_ID": 31,
        "MODEL": 32,
        "RF_BAND": 8,
        "GROUP_CHANNEL": 5,
        "GROUP_CHANNEL2": 5,
    },
    number_digits={
        "METER_RATE": 5,
        "AUDIO_GAIN": 3,
        "FREQUENCY": 7,
        "FREQUENCY2": 7,
        "TX_OFFSET": 3,
        "TX_BATT_BARS": 3,
        "TX_BATT_CHARGE_PERCENT": 3,
        "TX_BATT_CYCLE_COUNT": 5,
        "TX_BATT_HEALTH_PERCENT": 3,
        "TX_BATT_MINS": 5,
        "TX_POWER_LEVEL": 3,
        "CHAN_QUALITY": 3,
        "RSSI": 3,
    },
    supports_mute=True,
    supports_flash=True,
    tx_offset_bias_db=12,
    tx_offset_range=(0, 32),
)

SLXD = SlxdDialect(
    family=Family.SLXD,
    name_width=31,
    frequency_digits=6,
    group_param="GROUP_CHANNEL",
    tx=TxParams(
        model="TX_MODEL",
        bars="TX_BATT_BARS",
        percent=None,
        minutes="TX_BATT_MINS",
        battery_type=None,
        cycles=None,
        health=None,
        temp_c=None,
        muted=None,
        offset=None,
        rf_power=None,
        lock=None,
    ),
    identity_params=("MODEL", "FW_VER", "DEVICE_ID", "RF_BAND"),
    device_params=("FW_VER", "DEVICE_ID", "RF_BAND", "MODEL", "LOCK_STATUS", "FLASH"),
    channel_params=(
        "CHAN_NAME",
        "METER_RATE",
        "AUDIO_GAIN",
        "FREQUENCY",
        "GROUP_CHANNEL",
        "TX_MODEL",
        "TX_BATT_BARS",
        "TX_BATT_MINS",
    ),
    # DEVICE_ID 8 and RF_BAND 8 characters on SLX-D: assumed; SLX-D frequency 6 digits: assumed.
    string_widths={
        "CHAN_NAME": 31,
        "FW_VER": 24,
        "MODEL": 32,
        "DEVICE_ID": 8,
        "RF_BAND": 8,
        "GROUP_CHANNEL": 5,
    },
    number_digits={"METER_RATE": 5, "AUDIO_GAIN": 3, "FREQUENCY": 6, "TX_BATT_BARS": 3, "TX_BATT_MINS": 5},
    supports_mute=False,
    supports_flash=True,
)

DIALECTS: dict[Family, Dialect] = {d.family: d for d in (ULXD, QLXD, AXIENT, SLXD)}


def dialect_for(family: Family) -> Dialect | None:
    """The dialect of ``family``, or ``None`` if it does not speak Shure command strings."""
    return DIALECTS.get(family)
