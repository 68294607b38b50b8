"""The normalized device model every driver maps into and every consumer reads.

Units are in the field names. ``None`` always means "unknown", never a magic number: the
vendor sentinels (255, 65535, ...) are turned into ``None`` by the drivers.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict

# Strict scalars: the wire carries typed msgpack values, so "4" is not a battery bar count.
Int = Annotated[int, Strict()]
#: A finite number: NaN and infinities are no reading, and would poison sums and comparisons.
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Percent = Annotated[int, Strict(), Field(ge=0, le=100)]
Bars = Annotated[int, Strict(), Field(ge=0, le=5)]
Minutes = Annotated[int, Strict(), Field(ge=0)]
#: Text as msgpack's str type; strict, so raw bytes (msgpack's bin type) are refused, not decoded.
ShortText = Annotated[str, Strict(), Field(max_length=128)]


class Vendor(StrEnum):
    """Receiver manufacturers micboard understands."""

    SHURE = "shure"
    SENNHEISER = "sennheiser"


class Family(StrEnum):
    """Receiver families: each speaks one protocol dialect."""

    ULXD = "ulxd"
    QLXD = "qlxd"
    AXIENT = "axient"
    SLXD = "slxd"
    EWDX = "ewdx"
    D6000 = "d6000"


class Antenna(StrEnum):
    """Receive antennas, in the order used by per-antenna lists such as ``rf_dbm``."""

    A = "A"
    B = "B"
    C = "C"
    D = "D"


class AntennaState(StrEnum):
    """What a receiver says of one of its antennas, where it says it (ULX-D, QLX-D, Axient Digital).

    ``red`` is Axient Digital's own warning (its antenna LED turns red): the receiver judges the
    signal on that antenna poor, so it is shown as the receiver shows it, not guessed from a level.
    """

    ACTIVE = "active"
    INACTIVE = "inactive"
    RED = "red"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Transmitter(_Frozen):
    """The body-pack or hand-held transmitter linked to a receiver channel."""

    model: ShortText | None = None
    battery_bars: Bars | None = None
    battery_percent: Percent | None = None
    runtime_min: Minutes | None = None
    battery_type: ShortText | None = None
    battery_cycles: Annotated[int, Strict(), Field(ge=0)] | None = None
    battery_health_percent: Percent | None = None
    battery_temp_c: Annotated[int, Strict(), Field(ge=-40, le=125)] | None = None
    muted: Bool | None = None
    tx_offset_db: Annotated[int, Strict(), Field(ge=-40, le=40)] | None = None
    rf_power: ShortText | None = None
    locked: ShortText | None = None


class ReceiverChannel(_Frozen):
    """One receive channel: its configuration and the transmitter linked to it, if any.

    Fast-changing levels (RF, audio) are not part of the state: see :class:`ChannelMeter`.
    """

    index: Annotated[int, Strict(), Field(ge=1, le=64)]
    name: ShortText | None = None
    frequency_khz: Annotated[int, Strict(), Field(ge=0, le=10_000_000)] | None = None
    group_channel: ShortText | None = None
    audio_gain_db: Annotated[int, Strict(), Field(ge=-60, le=80)] | None = None
    muted: Bool | None = None
    interference: Bool | None = None
    encrypted: Bool | None = None
    warnings: tuple[ShortText, ...] = ()
    transmitter: Transmitter | None = None

    @property
    def name_id(self) -> str | None:
        """The channel id part of the name (``HH01`` in ``HH01 Fatai``)."""
        return split_channel_name(self.name)[0]

    @property
    def name_person(self) -> str | None:
        """The person part of the name (``Fatai`` in ``HH01 Fatai``)."""
        return split_channel_name(self.name)[1]


class ChannelMeter(_Frozen):
    """Live levels of one channel: throttled, never persisted, latest wins."""

    index: Annotated[int, Strict(), Field(ge=1, le=64)]
    rf_dbm: tuple[Float | None, ...] = ()
    active_antenna: Antenna | None = None
    #: Per antenna, in the order of ``rf_dbm``, as the receiver reports them; empty where the
    #: family reports no such thing (SLX-D, SSC), and then readers judge from the levels.
    antenna_states: tuple[AntennaState, ...] = Field(default=(), max_length=4)
    audio_dbfs: Float | None = None
    audio_peak_dbfs: Float | None = None
    link_quality_percent: Percent | None = None


class Device(_Frozen):
    """A receiver as the agent last saw it."""

    device_key: Annotated[str, Strict(), Field(min_length=1, max_length=128)]
    vendor: Vendor
    family: Family
    model: ShortText | None = None
    device_id: ShortText | None = None
    serial: ShortText | None = None
    firmware: ShortText | None = None
    rf_band: ShortText | None = None
    address: ShortText | None = None
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] | None = None
    name: ShortText | None = None
    channels: tuple[ReceiverChannel, ...] = ()

    @property
    def channel_count(self) -> int:
        """How many receive channels the device has."""
        return len(self.channels)

    def channel(self, index: int) -> ReceiverChannel | None:
        """The channel with ``index`` (1-based), or ``None``."""
        for channel in self.channels:
            if channel.index == index:
                return channel
        return None


_NAME_SPLIT = re.compile(r"^\s*(\S+)(?:\s+(.*\S))?\s*$")
_NAME_ID = re.compile(r"^[A-Za-z]{1,4}\d{1,3}$")


def split_channel_name(name: str | None) -> tuple[str | None, str | None]:
    """Split ``HH01 Fatai`` into ``("HH01", "Fatai")``; underscores read as spaces.

    A name without a leading id such as ``Vox 1`` is all person: ``(None, "Vox 1")``.
    """
    if name is None:
        return None, None
    text = name.replace("_", " ").strip()
    if not text:
        return None, None
    match = _NAME_SPLIT.match(text)
    if match is None:  # pragma: no cover - the pattern matches any non-blank text
        return None, text
    first, rest = match.group(1), match.group(2)
    if _NAME_ID.match(first):
        return first, rest
    return None, text


def device_changes(old: Device, new: Device) -> dict[str, Any]:
    """The fields of ``new`` that differ from ``old``, as a delta :func:`apply_changes` reverses.

    Channels are keyed by index; a changed transmitter is given whole (or ``None`` when gone).
    """
    before = old.model_dump(mode="python")
    after = new.model_dump(mode="python")
    changes: dict[str, Any] = {
        key: value
        for key, value in after.items()
        if key not in ("channels", "device_key") and before.get(key) != value
    }
    old_channels = {c["index"]: c for c in before["channels"]}
    channel_changes: dict[int, dict[str, Any]] = {}
    for channel in after["channels"]:
        previous = old_channels.get(channel["index"])
        if previous is None:
            channel_changes[channel["index"]] = channel
            continue
        diff = {k: v for k, v in channel.items() if previous.get(k) != v}
        if diff:
            channel_changes[channel["index"]] = diff
    if channel_changes:
        changes["channels"] = channel_changes
    return changes


def apply_changes(device: Device, changes: dict[str, Any]) -> Device:
    """Apply a delta made by :func:`device_changes`; raises ``pydantic.ValidationError`` if invalid."""
    data = device.model_dump(mode="python")
    channel_changes = changes.get("channels", {})
    data.update({k: v for k, v in changes.items() if k != "channels"})
    channels = {c["index"]: c for c in data["channels"]}
    for raw_index, diff in channel_changes.items():
        index = int(raw_index)
        merged = dict(channels.get(index, {"index": index}))
        merged.update(diff)
        merged["index"] = index
        channels[index] = merged
    data["channels"] = [channels[i] for i in sorted(channels)]
    return Device.model_validate(data)
