"""The normalized device model: name split, deltas, units and unknowns."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from micboard.shared.model import (
    Device,
    Family,
    ReceiverChannel,
    Transmitter,
    Vendor,
    apply_changes,
    device_changes,
    split_channel_name,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("HH01 Fatai", ("HH01", "Fatai")),
        ("HH01_Fatai", ("HH01", "Fatai")),
        ("BP12 Anna Maria", ("BP12", "Anna Maria")),
        ("HH01", ("HH01", None)),
        ("Vox 1", (None, "Vox 1")),
        ("  Lead   ", (None, "Lead")),
        ("", (None, None)),
        ("___", (None, None)),
        (None, (None, None)),
    ],
)
def test_split_channel_name(name: str | None, expected: tuple[str | None, str | None]) -> None:
    assert split_channel_name(name) == expected


def test_channel_name_properties() -> None:
    channel = ReceiverChannel(index=1, name="HH01 Fatai")
    assert (channel.name_id, channel.name_person) == ("HH01", "Fatai")


def test_unknown_is_none_and_ranges_are_enforced() -> None:
    tx = Transmitter()
    assert tx.battery_bars is None and tx.battery_percent is None and tx.runtime_min is None
    with pytest.raises(ValidationError):
        Transmitter(battery_bars=6)
    with pytest.raises(ValidationError):
        Transmitter(battery_percent=101)
    with pytest.raises(ValidationError):
        ReceiverChannel(index=0)


def test_device_helpers() -> None:
    device = Device(
        device_key="k",
        vendor=Vendor.SENNHEISER,
        family=Family.EWDX,
        channels=(ReceiverChannel(index=1), ReceiverChannel(index=2)),
    )
    assert device.channel_count == 2
    assert device.channel(2) == ReceiverChannel(index=2)
    assert device.channel(3) is None


def test_changes_of_identical_devices_are_empty() -> None:
    device = Device(device_key="k", vendor=Vendor.SHURE, family=Family.AXIENT)
    assert device_changes(device, device) == {}


def test_new_channel_and_transmitter_gone() -> None:
    old = Device(
        device_key="k",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(ReceiverChannel(index=1, transmitter=Transmitter(battery_bars=3)),),
    )
    new = Device(
        device_key="k",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4D",
        channels=(ReceiverChannel(index=1), ReceiverChannel(index=2, name="B")),
    )
    changes = device_changes(old, new)
    assert changes["model"] == "ULXD4D"
    assert changes["channels"][1] == {"transmitter": None}
    assert changes["channels"][2]["name"] == "B"
    assert apply_changes(old, changes) == new


_tx = st.builds(
    Transmitter,
    battery_bars=st.none() | st.integers(0, 5),
    battery_percent=st.none() | st.integers(0, 100),
    muted=st.none() | st.booleans(),
)
_channel = st.builds(
    ReceiverChannel,
    index=st.integers(1, 4),
    name=st.none() | st.text(max_size=8),
    frequency_khz=st.none() | st.integers(470_000, 700_000),
    transmitter=st.none() | _tx,
)


@st.composite
def devices(draw: st.DrawFn) -> Device:
    chans = {c.index: c for c in draw(st.lists(_channel, max_size=4))}
    return Device(
        device_key="k",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model=draw(st.none() | st.sampled_from(["ULXD4", "ULXD4Q"])),
        channels=tuple(chans[i] for i in sorted(chans)),
    )


@settings(max_examples=300, deadline=None)
@given(devices(), devices())
def test_apply_changes_reverses_device_changes(old: Device, new: Device) -> None:
    # Channels are never removed by a delta, so compare on devices whose channel set only grows.
    merged = {c.index: c for c in old.channels} | {c.index: c for c in new.channels}
    new = new.model_copy(update={"channels": tuple(merged[i] for i in sorted(merged))})
    assert apply_changes(old, device_changes(old, new)) == new
