"""From SSC v1 values to the normalized model.

Every function takes whatever the device sent (any JSON value) and never raises: a value of
the wrong type or outside its plausible range reads as unknown (``None``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from micboard.agent.drivers.sennheiser.protocol import is_finite_number
from micboard.shared.model import Antenna, ChannelMeter, Device, Family, ReceiverChannel, Transmitter, Vendor

MAX_TEXT = 128
MAX_WARNINGS = 16
# Receivers keep an 8-character channel name (what the EW-DX and EM 6000 displays show); the
# EM 6000 also refuses these punctuation characters.
CHANNEL_NAME_MAX = 8
_D6000_FORBIDDEN = frozenset("{}[]()~`!@$%^&_\\:'\".?")
_PRODUCT_CHANNELS = re.compile(r"\bEM\s?(\d)\b", re.IGNORECASE)

_DIVI_ANTENNA = {1: Antenna.A, 2: Antenna.B}


def _number(value: Any, low: float, high: float) -> float | None:
    if is_finite_number(value) and low <= value <= high:
        return float(value)
    return None


def _integer(value: Any, low: int, high: int) -> int | None:
    number = _number(value, low, high)
    return None if number is None else round(number)


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    # A lone surrogate from a \\ud800 escape cannot be encoded later on the wire.
    return value.encode("utf-8", "replace").decode("utf-8")[:MAX_TEXT]


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def warnings_from_ssc(*values: Any) -> tuple[str, ...]:
    """Merge SSC ``warnings`` lists (e.g. ``["AfPeak", "LowBattery"]``) without duplicates."""
    merged: list[str] = []
    for value in values:
        if not isinstance(value, list):
            continue
        for item in value:
            text = _text(item)
            if text and text not in merged and len(merged) < MAX_WARNINGS:
                merged.append(text)
    return tuple(merged)


def antenna_from_divi(value: Any) -> Antenna | None:
    """``m/rxN/divi``: 1 is antenna A, 2 is antenna B, 0 (no transmitter) or anything else is unknown."""
    return _DIVI_ANTENNA.get(value) if _is_plain_int(value) else None


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def battery_bars_from_percent(percent: int | None) -> int | None:
    """Five bars of 20 % each, rounded up: 100 % is 5 bars, 41-60 % is 3, 0 % is 0."""
    if percent is None:
        return None
    return min(5, math.ceil(percent / 20))


def meter_from_ssc(index: int, values: Any) -> ChannelMeter:
    """Map ``m/rxN`` (``rssi`` dBm, ``rsqi`` %, ``divi``, ``af`` dBFS) into a :class:`ChannelMeter`.

    SSC v1 reports one RSSI for the received signal, not one per antenna: ``rf_dbm`` holds it in
    the slot of the antenna diversity chose (``(None, rssi)`` when it is B), since ``rf_dbm`` is
    per antenna, and in the first slot when none is active (no transmitter: the noise floor).
    """
    fields = _mapping(values)
    rssi = _number(fields.get("rssi"), -150.0, 20.0)
    active = antenna_from_divi(fields.get("divi"))
    rf_dbm: tuple[float | None, ...] = ()
    if rssi is not None:
        rf_dbm = (None, rssi) if active is Antenna.B else (rssi,)
    return ChannelMeter(
        index=index,
        rf_dbm=rf_dbm,
        active_antenna=active,
        audio_dbfs=_number(fields.get("af"), -200.0, 20.0),
        link_quality_percent=_integer(fields.get("rsqi"), 0, 100),
    )


def transmitter_from_ssc(mate: Any) -> Transmitter | None:
    """Map ``mates/txN`` into a :class:`Transmitter`; ``None`` when there is no mate tree."""
    if not isinstance(mate, Mapping):
        return None
    battery = _mapping(mate.get("battery"))
    percent = _integer(battery.get("gauge"), 0, 100)
    return Transmitter(
        model=_text(mate.get("type")),
        battery_percent=percent,
        battery_bars=battery_bars_from_percent(percent),
        runtime_min=_integer(battery.get("lifetime"), 0, 100_000),
        battery_type=_text(battery.get("type")),
        muted=_bool(mate.get("mute")),
        tx_offset_db=_integer(mate.get("trim"), -40, 40),
    )


def channel_from_ssc(index: int, rx: Any, mate: Any) -> ReceiverChannel:
    """Map ``rxN`` and its ``mates/txN`` (``None`` when no transmitter) into a :class:`ReceiverChannel`."""
    fields = _mapping(rx)
    transmitter = transmitter_from_ssc(mate)
    mate_warnings = mate.get("warnings") if isinstance(mate, Mapping) else None
    return ReceiverChannel(
        index=index,
        name=_text(fields.get("name")),
        frequency_khz=_integer(fields.get("frequency"), 1, 10_000_000),
        audio_gain_db=_integer(fields.get("gain"), -60, 80),
        muted=_bool(fields.get("mute")),
        warnings=warnings_from_ssc(fields.get("warnings"), mate_warnings),
        transmitter=transmitter,
    )


def device_from_ssc(
    *,
    device_key: str,
    family: Family,
    address: str,
    port: int,
    identity: Any,
    name: Any,
    channels: Sequence[ReceiverChannel],
) -> Device:
    """Build the :class:`Device` from ``device/identity``, ``device/name`` and the mapped channels."""
    fields = _mapping(identity)
    serial = _text(fields.get("serial"))
    return Device(
        device_key=device_key,
        vendor=Vendor.SENNHEISER,
        family=family,
        model=_text(fields.get("product")),
        device_id=serial,
        serial=serial,
        firmware=_text(fields.get("version")),
        address=address[:MAX_TEXT],
        port=port if 0 <= port <= 65535 else None,
        name=_text(name),
        channels=tuple(channels),
    )


def channel_count(family: Family, product: str | None) -> int:
    """Receive channels of a product: EW-DX EM 4 has four, EM 2 and EM 6000 have two."""
    if family is Family.EWDX and product is not None:
        match = _PRODUCT_CHANNELS.search(product)
        if match is not None and match.group(1) == "4":
            return 4
    return 2


def channel_name_problem(name: str, family: Family) -> str | None:
    """Why ``name`` cannot be a channel name on ``family`` (too long, not printable ASCII), or ``None``."""
    # Worded as the Shure driver words them: the dashboard shows either to the same people.
    if not name.strip():
        return "a name must not be empty or blank"
    if len(name) > CHANNEL_NAME_MAX:
        return f"names are at most {CHANNEL_NAME_MAX} characters on {family}"
    if not all(" " <= char <= "~" for char in name):
        return "name has characters other than printable ASCII"
    if family is Family.D6000:
        bad = sorted(set(name) & _D6000_FORBIDDEN)
        if bad:
            return f"name has characters the EM 6000 refuses: {''.join(bad)}"
    return None
